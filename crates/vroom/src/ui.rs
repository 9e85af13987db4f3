//! `vroom ui`: the web dashboard in a local browser. vroomd serves the
//! dashboard on its API (`/ui/`); a browser cannot speak to a unix socket,
//! so this command listens on a loopback port and carries each request
//! through to vroomd over the same connection the CLI uses (the socket, or
//! `--host`'s mutual TLS), as the user who runs it: the socket stays the
//! only way in. It prints a link with a one-time token, which the browser
//! exchanges for a session cookie; who may pass is decided in
//! [`access`].

mod access;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use vroom_base::LockExt;
use vroom_client::Client;

use self::access::{Access, Asked, Verdict, COOKIE, TOKEN_TTL};

#[derive(Clone)]
struct Proxy {
    client: Client,
    access: Arc<Mutex<Access>>,
}

/// Serves the dashboard on `127.0.0.1:port` (any free port for 0) until
/// Ctrl-C or SIGTERM.
pub async fn serve(client: Client, port: u16) -> Result<i32> {
    // Say now, not in the browser, when vroomd is not there.
    client.version().await.context("cannot reach vroomd")?;
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))
        .await
        .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
    let port = listener.local_addr()?.port();
    let token = random_hex()?;
    let proxy = Proxy {
        client,
        access: Arc::new(Mutex::new(Access::new(port, token.clone(), Instant::now()))),
    };
    println!("http://127.0.0.1:{port}/ui/?token={token}");
    std::io::stdout().flush().ok();
    eprintln!(
        "vroom ui: open the link above within {} s; it works once (its browser keeps a session). Ctrl-C stops the dashboard.",
        TOKEN_TTL.as_secs()
    );
    let app = axum::Router::new().fallback(handle).with_state(proxy);
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::select! {
        served = axum::serve(listener, app) => served.context("the dashboard's listener failed")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(0)
}

/// 32 random bytes as hex: the link's token or a session id.
fn random_hex() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Headers a browser sends that vroomd must not see: the proxy's own
/// session, what it checked itself, and hop-by-hop headers.
const DROPPED: [&str; 10] = [
    "cookie",
    "origin",
    "referer",
    "sec-fetch-site",
    "sec-fetch-mode",
    "sec-fetch-dest",
    "sec-fetch-user",
    "connection",
    "keep-alive",
    "upgrade",
];

async fn handle(State(proxy): State<Proxy>, request: Request) -> Response {
    let headers = request.headers();
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let asked = Asked {
        method: request.method().as_str(),
        path: request.uri().path(),
        query: request.uri().query(),
        host: text(header::HOST),
        origin: text(header::ORIGIN),
        fetch_site: headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()),
        cookie: text(header::COOKIE),
    };
    let verdict = {
        let mut access = proxy.access.lock_unpoisoned();
        access.decide(&asked, Instant::now(), || {
            random_hex().unwrap_or_else(|_| String::new())
        })
    };
    match verdict {
        Verdict::Forward => forward(&proxy.client, request).await,
        Verdict::SignIn { session, location } if !session.is_empty() => {
            let cookie = format!("{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/");
            let mut headers = HeaderMap::new();
            headers.insert(
                header::LOCATION,
                HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/ui/")),
            );
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                headers.insert(header::SET_COOKIE, cookie);
            }
            headers.insert(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            );
            (StatusCode::SEE_OTHER, headers).into_response()
        }
        Verdict::SignIn { .. } => refusal(
            500,
            "No session",
            "vroom ui could not make a session id (cannot read /dev/urandom).",
        ),
        Verdict::Refuse {
            status,
            title,
            message,
        } => {
            eprintln!("vroom ui: refused {} {}: {title}", asked.method, asked.path);
            refusal(status, title, &message)
        }
    }
}

/// Sends a request on to vroomd and its answer back, streaming both ways.
async fn forward(client: &Client, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    for name in DROPPED {
        parts.headers.remove(name);
    }
    let outgoing = hyper::Request::from_parts(parts, body);
    match client.forward(outgoing).await {
        Ok(answer) => {
            let (mut parts, body) = answer.into_parts();
            for name in ["connection", "keep-alive", "transfer-encoding"] {
                parts.headers.remove(name);
            }
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => refusal(
            502,
            "vroomd is not answering",
            &format!("The dashboard could not reach vroomd: {e}"),
        ),
    }
}

/// A page saying why a request was refused.
fn refusal(status: u16, title: &str, message: &str) -> Response {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t} · vroom</title></head>\
         <body><h1>{t}</h1><p id=\"refusal\">{m}</p></body></html>\n",
        t = esc(title),
        m = esc(message)
    );
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        html,
    )
        .into_response()
}
