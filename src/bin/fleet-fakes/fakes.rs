//! Loopback stand-ins for what lives on the internet, behaving like the real APIs where a
//! gateway can tell: a Telegram Bot API (per-token update queues, long polling with offsets,
//! `409` for a second poller of one token, `401` for a revoked token, `sendMessage` recorded)
//! and an OpenAI-compatible model server (streamed chat completions, the API key of every
//! request recorded). Plain threads and std sockets on 127.0.0.1; every wait is bounded.
//! Used by the test suite (included by path) and by the `fleet-fakes` program of the demo,
//! which drives them through `POST /_fake/say`.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One HTTP request as the fakes need it.
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// Reads one request off a keep-alive connection; `None` at EOF or on garbage.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<HttpRequest> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if let Some(n) = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        body.resize(n.min(16 << 20), 0);
        r.read_exact(&mut body).ok()?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 {
                let mut end = String::new();
                r.read_line(&mut end).ok()?;
                break;
            }
            let mut chunk = vec![0; n];
            r.read_exact(&mut chunk).ok()?;
            body.extend_from_slice(&chunk);
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).ok()?;
        }
    }
    Some(HttpRequest {
        method,
        path,
        headers,
        body,
    })
}

fn respond(w: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        _ => "Error",
    };
    write!(
        w,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
}

/// Answers one request; `false` when it closed the exchange itself.
type Handler = Arc<dyn Fn(HttpRequest, &mut TcpStream) -> bool + Send + Sync>;

/// Accepts on `listener` until the process ends, one thread per connection.
fn serve(listener: TcpListener, handle: Handler) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let handle = handle.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
                let Ok(mut w) = conn.try_clone() else { return };
                let mut r = BufReader::new(conn);
                while let Some(req) = read_request(&mut r) {
                    // `false`: the handler closed the exchange (a streamed answer).
                    if !handle(req, &mut w) {
                        return;
                    }
                }
            });
        }
    });
}

// ---- Telegram Bot API -----------------------------------------------------------------------

/// A message a bot sent.
#[derive(Debug, Clone)]
pub struct Sent {
    pub chat_id: String,
    pub text: String,
    pub at: Instant,
}

#[derive(Default)]
struct Bot {
    updates: VecDeque<Value>,
    next_update: i64,
    sent: Vec<Sent>,
    pollers: u32,
    revoked: bool,
    calls: Vec<String>,
    /// `setWebhook`'s url and secret_token; while set, getUpdates answers 409 as the real
    /// API does.
    webhook: Option<(String, String)>,
}

#[derive(Default)]
struct TgState {
    bots: HashMap<String, Bot>,
}

/// The fake Bot API. Tokens must be added before a gateway uses them (others get 401).
#[derive(Clone)]
pub struct FakeTelegram {
    pub port: u16,
    state: Arc<(Mutex<TgState>, Condvar)>,
}

impl FakeTelegram {
    pub fn start() -> FakeTelegram {
        Self::start_on(0).expect("bind fake Telegram")
    }

    /// On a chosen loopback port (0: any).
    pub fn start_on(port: u16) -> std::io::Result<FakeTelegram> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr().unwrap().port();
        let state: Arc<(Mutex<TgState>, Condvar)> = Arc::default();
        let s = state.clone();
        serve(listener, Arc::new(move |req, w| tg_handle(&s, req, w)));
        Ok(FakeTelegram { port, state })
    }

    /// The `apiRoot` a gateway is given.
    pub fn api_root(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A new token of an existing bot (same `<id>:` prefix, as after a revoke in BotFather)
    /// continues its update ids, as the real API does: a gateway's saved offset stays valid.
    pub fn add_bot(&self, token: &str) {
        let mut st = self.state.0.lock().unwrap();
        let id = token.split(':').next().unwrap_or_default();
        let last = st
            .bots
            .iter()
            .filter(|(t, _)| t.split(':').next() == Some(id))
            .map(|(_, b)| b.next_update)
            .max()
            .unwrap_or(0);
        let bot = st.bots.entry(token.to_string()).or_default();
        bot.next_update = bot.next_update.max(1000).max(last);
    }

    /// Every later call with this token answers 401, as for a token revoked in BotFather.
    pub fn revoke(&self, token: &str) {
        let mut st = self.state.0.lock().unwrap();
        if let Some(b) = st.bots.get_mut(token) {
            b.revoked = true;
        }
        self.state.1.notify_all();
    }

    /// A direct message from user `from` to the bot of `token`.
    pub fn send_dm(&self, token: &str, from: i64, text: &str) {
        let mut st = self.state.0.lock().unwrap();
        let bot = st.bots.get_mut(token).expect("add_bot first");
        push_dm(bot, from, text);
        self.state.1.notify_all();
    }

    /// What the bot of `token` has sent so far.
    pub fn sent(&self, token: &str) -> Vec<Sent> {
        let st = self.state.0.lock().unwrap();
        st.bots
            .get(token)
            .map(|b| b.sent.clone())
            .unwrap_or_default()
    }

    /// The webhook (url, secret token) the bot of `token` registered, if any.
    pub fn webhook(&self, token: &str) -> Option<(String, String)> {
        let st = self.state.0.lock().unwrap();
        st.bots.get(token).and_then(|b| b.webhook.clone())
    }

    /// The Bot API methods the bot of `token` called, in order.
    pub fn calls(&self, token: &str) -> Vec<String> {
        let st = self.state.0.lock().unwrap();
        st.bots
            .get(token)
            .map(|b| b.calls.clone())
            .unwrap_or_default()
    }
}

fn push_dm(bot: &mut Bot, from: i64, text: &str) {
    bot.next_update += 1;
    bot.updates
        .push_back(dm_update(bot.next_update, from, text));
}

/// A Telegram update carrying a direct message from user `from` (what getUpdates returns and
/// what Telegram POSTs to a webhook).
pub fn dm_update(id: i64, from: i64, text: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({
        "update_id": id,
        "message": {
            "message_id": id,
            "from": {"id": from, "is_bot": false, "first_name": "Ann", "username": "ann"},
            "chat": {"id": from, "type": "private", "first_name": "Ann", "username": "ann"},
            "date": now,
            "text": text,
        }
    })
}

/// `POST /_fake/say {"token", "from", "text", "timeout_s"}`: a DM to that bot, answered with
/// the bot's next message (`{"ok": true, "reply": …}`) or 504 after the timeout (at most 300 s).
fn say(state: &Arc<(Mutex<TgState>, Condvar)>, req: &HttpRequest, w: &mut TcpStream) -> bool {
    let args: Value = serde_json::from_slice(&req.body).unwrap_or(json!({}));
    let token = args["token"].as_str().unwrap_or_default().to_string();
    let from = args["from"].as_i64().unwrap_or(4242);
    let text = args["text"].as_str().unwrap_or_default().to_string();
    let timeout = Duration::from_secs(args["timeout_s"].as_u64().unwrap_or(120).min(300));
    let (lock, cv) = &**state;
    let mut st = lock.lock().unwrap();
    let Some(bot) = st.bots.get_mut(&token) else {
        drop(st);
        return respond(
            w,
            404,
            &json!({"ok": false, "description": "no such bot: start fleet-fakes with --bot TOKEN"}),
        )
        .is_ok();
    };
    let before = bot.sent.len();
    push_dm(bot, from, &text);
    cv.notify_all();
    let deadline = Instant::now() + timeout;
    loop {
        let bot = st.bots.get(&token).expect("bots are never removed");
        if let Some(s) = bot.sent.get(before) {
            let reply = s.text.clone();
            drop(st);
            return respond(w, 200, &json!({"ok": true, "reply": reply})).is_ok();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            drop(st);
            let why = format!("the bot did not answer within {} s", timeout.as_secs());
            return respond(w, 504, &json!({"ok": false, "description": why})).is_ok();
        }
        st = cv.wait_timeout(st, left).unwrap().0;
    }
}

fn tg_handle(state: &Arc<(Mutex<TgState>, Condvar)>, req: HttpRequest, w: &mut TcpStream) -> bool {
    if req.method == "POST" && req.path == "/_fake/say" {
        return say(state, &req, w);
    }
    let Some(rest) = req.path.strip_prefix("/bot") else {
        return respond(
            w,
            404,
            &json!({"ok": false, "error_code": 404, "description": "Not Found"}),
        )
        .is_ok();
    };
    let (token, method) = match rest.split_once('/') {
        Some((t, m)) => (t.to_string(), m.split('?').next().unwrap_or("").to_string()),
        None => (rest.to_string(), String::new()),
    };
    let args: Value = serde_json::from_slice(&req.body).unwrap_or(json!({}));
    let (lock, cv) = &**state;
    let mut st = lock.lock().unwrap();
    let unauthorized = json!({"ok": false, "error_code": 401, "description": "Unauthorized"});
    let Some(bot) = st.bots.get_mut(&token) else {
        drop(st);
        return respond(w, 401, &unauthorized).is_ok();
    };
    bot.calls.push(method.clone());
    if bot.revoked {
        drop(st);
        return respond(w, 401, &unauthorized).is_ok();
    }
    let answer = match method.as_str() {
        "getMe" => {
            json!({"ok": true, "result": {"id": 777, "is_bot": true, "first_name": "Fake", "username": "fake_bot", "can_join_groups": true, "can_read_all_group_messages": false, "supports_inline_queries": false}})
        }
        "setWebhook" => {
            let url = args["url"].as_str().unwrap_or_default().to_string();
            if url.is_empty() {
                bot.webhook = None;
            } else {
                let secret = args["secret_token"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                bot.webhook = Some((url, secret));
            }
            json!({"ok": true, "result": true, "description": "Webhook was set"})
        }
        "deleteWebhook" => {
            bot.webhook = None;
            json!({"ok": true, "result": true, "description": "Webhook was deleted"})
        }
        "getWebhookInfo" => {
            let url = bot
                .webhook
                .as_ref()
                .map(|w| w.0.clone())
                .unwrap_or_default();
            json!({"ok": true, "result": {"url": url, "has_custom_certificate": false, "pending_update_count": 0}})
        }
        "getUpdates" if bot.webhook.is_some() => {
            let c = json!({"ok": false, "error_code": 409, "description": "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first"});
            drop(st);
            return respond(w, 409, &c).is_ok();
        }
        "getUpdates" => {
            if bot.pollers > 0 {
                let c = json!({"ok": false, "error_code": 409, "description": "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running"});
                drop(st);
                return respond(w, 409, &c).is_ok();
            }
            let offset = args["offset"].as_i64().unwrap_or(0);
            let timeout = Duration::from_secs(args["timeout"].as_u64().unwrap_or(0).min(30));
            let limit = args["limit"].as_u64().unwrap_or(100) as usize;
            bot.updates
                .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= offset);
            bot.pollers += 1;
            let deadline = Instant::now() + timeout;
            loop {
                let bot = st.bots.get_mut(&token).expect("bots are never removed");
                if !bot.updates.is_empty() || bot.revoked || Instant::now() >= deadline {
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                st = cv.wait_timeout(st, left).unwrap().0;
            }
            let bot = st.bots.get_mut(&token).expect("bots are never removed");
            bot.pollers -= 1;
            if bot.revoked {
                drop(st);
                return respond(w, 401, &unauthorized).is_ok();
            }
            let batch: Vec<Value> = bot.updates.iter().take(limit).cloned().collect();
            json!({"ok": true, "result": batch})
        }
        "sendMessage" => {
            let chat_id = match &args["chat_id"] {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            let text = args["text"].as_str().unwrap_or_default().to_string();
            bot.sent.push(Sent {
                chat_id: chat_id.clone(),
                text: text.clone(),
                at: Instant::now(),
            });
            let id = bot.sent.len();
            cv.notify_all();
            json!({"ok": true, "result": {"message_id": id, "date": 0, "chat": {"id": chat_id.parse::<i64>().unwrap_or(0), "type": "private"}, "text": text}})
        }
        _ => json!({"ok": true, "result": true}),
    };
    drop(st);
    respond(w, 200, &answer).is_ok()
}

// ---- OpenAI-compatible model server ---------------------------------------------------------

#[derive(Default)]
struct ModelState {
    keys: Vec<String>,
}

/// The fake model: every chat completion answers `reply` (with `{key}` replaced by the API key
/// the request carried, so a reply shows whose key asked), streamed when asked.
#[derive(Clone)]
pub struct FakeModel {
    pub port: u16,
    state: Arc<Mutex<ModelState>>,
}

impl FakeModel {
    pub fn start(reply: &str) -> FakeModel {
        Self::start_on(0, reply).expect("bind fake model")
    }

    /// On a chosen loopback port (0: any).
    pub fn start_on(port: u16, reply: &str) -> std::io::Result<FakeModel> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let port = listener.local_addr().unwrap().port();
        let state: Arc<Mutex<ModelState>> = Arc::default();
        let (s, reply) = (state.clone(), reply.to_string());
        serve(
            listener,
            Arc::new(move |req, w| model_handle(&s, &reply, req, w)),
        );
        Ok(FakeModel { port, state })
    }

    /// The `baseUrl` of a provider.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    /// The bearer keys of every completion request so far.
    pub fn keys(&self) -> Vec<String> {
        self.state.lock().unwrap().keys.clone()
    }
}

fn model_handle(
    state: &Arc<Mutex<ModelState>>,
    reply: &str,
    req: HttpRequest,
    w: &mut TcpStream,
) -> bool {
    if req.method == "GET" && req.path.ends_with("/models") {
        return respond(
            w,
            200,
            &json!({"object": "list", "data": [{"id": "m", "object": "model"}]}),
        )
        .is_ok();
    }
    if !req.path.ends_with("/chat/completions") {
        return respond(w, 404, &json!({"error": {"message": "not found"}})).is_ok();
    }
    let key = req
        .headers
        .get("authorization")
        .map(|v| v.trim_start_matches("Bearer ").to_string())
        .unwrap_or_default();
    state.lock().unwrap().keys.push(key.clone());
    let reply = reply.replace("{key}", &key);
    let reply = reply.as_str();
    let args: Value = serde_json::from_slice(&req.body).unwrap_or(json!({}));
    let model = args["model"].as_str().unwrap_or("m").to_string();
    if args["stream"].as_bool() != Some(true) {
        let body = json!({"id": "c1", "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
        return respond(w, 200, &body).is_ok();
    }
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut out = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
    );
    for ev in [
        chunk(json!({"role": "assistant", "content": reply}), Value::Null),
        chunk(json!({}), json!("stop")),
    ] {
        out.push_str(&format!("data: {ev}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    let _ = w.write_all(out.as_bytes());
    let _ = w.shutdown(std::net::Shutdown::Both);
    false
}
