/* healthz.c: the smallest child for benchmarks of peer supervisors. It serves GET /healthz
 * (200, anything else 404) on 127.0.0.1:$OPENCLAW_GATEWAY_PORT and exits 0 on SIGTERM; it has
 * no config, token, helper or failure switches (that is fleet-stub-agent's job).
 * Build: cc -O2 -o healthz bench/child/healthz.c */
#define _GNU_SOURCE /* accept4 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <arpa/inet.h>
#include <unistd.h>

#define MAXC 64
#define TIMEOUT_MS 2000

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

struct conn { int fd; int len; long born; char buf[1024]; };

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000L + t.tv_nsec / 1000000L;
}

static void answer(struct conn *c) {
    static const char ok[] = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        "Content-Length: 27\r\nConnection: close\r\n\r\n{\"ok\":true,\"status\":\"live\"}";
    static const char nf[] = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"
        "Connection: close\r\n\r\n";
    int hit = strncmp(c->buf, "GET /healthz ", 13) == 0 || strncmp(c->buf, "GET /healthz?", 13) == 0;
    ssize_t w = hit ? write(c->fd, ok, sizeof ok - 1) : write(c->fd, nf, sizeof nf - 1);
    (void)w;
}

int main(void) {
    const char *p = getenv("OPENCLAW_GATEWAY_PORT");
    int port = p ? atoi(p) : 0;
    if (port <= 0 || port > 65535) { fprintf(stderr, "healthz: OPENCLAW_GATEWAY_PORT unset or bad\n"); return 78; }

    struct sigaction sa = {0};
    sa.sa_handler = on_term; /* no SA_RESTART: poll must return EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 128)) { perror("healthz: bind"); return 1; }
    printf("healthz listening on 127.0.0.1:%d pid=%d\n", port, (int)getpid());
    fflush(stdout);

    static struct conn cs[MAXC];
    int n = 0;
    while (!stop) {
        struct pollfd pf[MAXC + 1];
        pf[0] = (struct pollfd){.fd = n < MAXC ? ls : -1, .events = POLLIN};
        for (int i = 0; i < n; i++) pf[i + 1] = (struct pollfd){.fd = cs[i].fd, .events = POLLIN};
        if (poll(pf, n + 1, 500) < 0 && errno != EINTR) { perror("healthz: poll"); return 1; }
        long t = now_ms();
        for (int i = n - 1; i >= 0; i--) {
            struct conn *c = &cs[i];
            int done = t - c->born > TIMEOUT_MS; /* a slow client loses its slot */
            if (!done && pf[i + 1].revents) {
                ssize_t r = read(c->fd, c->buf + c->len, sizeof c->buf - 1 - c->len);
                if (r <= 0 && !(r < 0 && errno == EAGAIN)) done = 1;
                else if (r > 0) {
                    c->len += r;
                    c->buf[c->len] = 0;
                    if (strstr(c->buf, "\r\n\r\n") || strstr(c->buf, "\n\n") || c->len >= (int)sizeof c->buf - 1) {
                        answer(c);
                        done = 1;
                    }
                }
            }
            if (done) { close(c->fd); cs[i] = cs[--n]; }
        }
        if (pf[0].revents & POLLIN) {
            while (n < MAXC) {
                int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (fd < 0) break;
                cs[n].fd = fd; cs[n].len = 0; cs[n].born = t; cs[n].buf[0] = 0;
                n++;
            }
        }
    }
    return 0;
}
