//! The tiny HTTP side: parsing a request, routing /healthz, /readyz and /whoami, responses,
//! and the lines a flood writes.

#[derive(Debug, PartialEq)]
pub(crate) struct Request<'a> {
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) bearer: Option<&'a str>,
}

#[derive(Debug, PartialEq)]
pub(crate) enum Parsed<'a> {
    Incomplete,
    Bad,
    Done(Request<'a>),
}

/// Parses a request head; the body (if any) is ignored since no route takes one.
pub(crate) fn parse_request(buf: &[u8]) -> Parsed<'_> {
    let end = match find(buf, b"\r\n\r\n").or_else(|| find(buf, b"\n\n")) {
        Some(e) => e,
        None => return Parsed::Incomplete,
    };
    let head = match std::str::from_utf8(&buf[..end]) {
        Ok(h) => h,
        Err(_) => return Parsed::Bad,
    };
    let mut lines = head.lines();
    let mut first = lines.next().unwrap_or("").split_ascii_whitespace();
    let (method, target, version) = match (first.next(), first.next(), first.next()) {
        (Some(m), Some(t), Some(v)) => (m, t, v),
        _ => return Parsed::Bad,
    };
    if !version.starts_with("HTTP/1.") {
        return Parsed::Bad;
    }
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let mut bearer = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("authorization") {
                let value = value.trim();
                if value.len() > 7 && value[..7].eq_ignore_ascii_case("bearer ") {
                    bearer = Some(value[7..].trim());
                }
            }
        }
    }
    Parsed::Done(Request {
        method,
        path,
        bearer,
    })
}

pub(crate) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[derive(Debug, PartialEq)]
pub(crate) enum Answer {
    Reply(u16, &'static str),
    Hang,
}

pub(crate) fn route(req: &Request, token: Option<&str>, ready: bool, hang_healthz: bool) -> Answer {
    if req.method != "GET" {
        return Answer::Reply(404, r#"{"ok":false,"error":"not found"}"#);
    }
    match req.path {
        "/healthz" if hang_healthz => Answer::Hang,
        "/healthz" => Answer::Reply(200, r#"{"ok":true,"status":"live"}"#),
        "/readyz" if ready => Answer::Reply(200, r#"{"ready":true}"#),
        "/readyz" => Answer::Reply(503, r#"{"ready":false}"#),
        "/whoami" => match (token, req.bearer) {
            (Some(t), Some(b)) if t == b => Answer::Reply(200, r#"{"ok":true}"#),
            _ => Answer::Reply(401, r#"{"ok":false,"error":"unauthorized"}"#),
        },
        _ => Answer::Reply(404, r#"{"ok":false,"error":"not found"}"#),
    }
}

pub(crate) fn response(code: u16, body: &str) -> String {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Status",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Builds `len` bytes of the flood stream starting at `pos`: `line` repeated, with the very
/// last byte of the stream forced to a newline so the output ends on a whole line.
pub(crate) fn flood_chunk(line: &[u8], pos: u64, total: u64, out: &mut [u8]) -> usize {
    let n = (total.saturating_sub(pos)).min(out.len() as u64) as usize;
    for (i, b) in out[..n].iter_mut().enumerate() {
        let p = pos + i as u64;
        *b = if p + 1 == total {
            b'\n'
        } else {
            line[(p % line.len() as u64) as usize]
        };
    }
    n
}

pub(crate) fn flood_line(len: usize) -> Vec<u8> {
    let mut line: Vec<u8> = b"stub-agent flood ".iter().copied().take(len - 1).collect();
    line.resize(len - 1, b'x');
    line.push(b'\n');
    line
}
