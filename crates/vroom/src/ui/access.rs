//! Who may use `vroom ui`'s proxy, as one pure decision per request
//! ([`Access::decide`]), tested on tables:
//!
//! 1. The `Host` must be the proxy's own loopback address (`127.0.0.1:PORT`
//!    or `localhost:PORT`): a page of another site whose name resolves to
//!    127.0.0.1 (DNS rebinding) gets nothing.
//! 2. A request that may change something (any method but `GET`/`HEAD`)
//!    must come from the dashboard's own origin: its `Origin` is present and
//!    is this proxy's, and `Sec-Fetch-Site`, when sent, is `same-origin`.
//! 3. The link's one-time token, within [`TOKEN_TTL`] and once only, is
//!    exchanged for a session cookie (`HttpOnly`, `SameSite=Strict`,
//!    `Path=/`) and the browser is sent on without it in the address.
//! 4. Everything else needs a session cookie, and goes only to the
//!    dashboard, the JSON API and the metrics.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How long the printed link works.
pub const TOKEN_TTL: Duration = Duration::from_secs(120);
/// The session cookie's name.
pub const COOKIE: &str = "vroom_ui";

/// The proxy's token, its sessions and its address.
pub struct Access {
    hosts: [String; 2],
    token: String,
    expires: Instant,
    spent: bool,
    sessions: HashSet<String>,
}

/// What the decision reads of a request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Asked<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub fetch_site: Option<&'a str>,
    pub cookie: Option<&'a str>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Send it on to vroomd.
    Forward,
    /// The token was good: set the session cookie and send the browser to
    /// `location`.
    SignIn { session: String, location: String },
    /// Refused, with a page saying why.
    Refuse {
        status: u16,
        title: &'static str,
        message: String,
    },
}

fn refuse(status: u16, title: &'static str, message: impl Into<String>) -> Verdict {
    Verdict::Refuse {
        status,
        title,
        message: message.into(),
    }
}

/// Equal, in a time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Access {
    pub fn new(port: u16, token: String, now: Instant) -> Self {
        Access {
            hosts: [format!("127.0.0.1:{port}"), format!("localhost:{port}")],
            token,
            expires: now + TOKEN_TTL,
            spent: false,
            sessions: HashSet::new(),
        }
    }

    /// What to do with a request; `new_session` makes a session id when a
    /// token is exchanged.
    pub fn decide(
        &mut self,
        asked: &Asked,
        now: Instant,
        new_session: impl FnOnce() -> String,
    ) -> Verdict {
        let Some(host) = asked
            .host
            .filter(|h| self.hosts.iter().any(|ours| ours == h))
        else {
            return refuse(
                403,
                "Wrong address",
                format!(
                    "This proxy answers only as http://{}/ (the request named the host {}). Open the link `vroom ui` printed.",
                    self.hosts[0],
                    asked.host.unwrap_or("(none)")
                ),
            );
        };
        if !matches!(asked.method, "GET" | "HEAD") {
            let own = format!("http://{host}");
            let same_site = asked.fetch_site.is_none_or(|s| s == "same-origin");
            if asked.origin != Some(own.as_str()) || !same_site {
                return refuse(
                    403,
                    "Cross-origin request refused",
                    format!(
                        "A {} from {} (Sec-Fetch-Site: {}) was refused and nothing was changed: changes come only from the dashboard's own pages.",
                        asked.method,
                        asked.origin.unwrap_or("no origin"),
                        asked.fetch_site.unwrap_or("not sent")
                    ),
                );
            }
        }
        let token = asked
            .query
            .unwrap_or("")
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="));
        if let Some(token) = token {
            if !same_secret(token, &self.token) {
                return refuse(
                    403,
                    "Unknown link",
                    "This link's token is not this proxy's. Run `vroom ui` for a new link.",
                );
            }
            if self.spent {
                return refuse(
                    403,
                    "Link already used",
                    "This link worked once and cannot be used again. Run `vroom ui` for a new link.",
                );
            }
            if now >= self.expires {
                return refuse(
                    403,
                    "Link expired",
                    format!(
                        "This link expired {} s after `vroom ui` printed it. Run `vroom ui` for a new link.",
                        TOKEN_TTL.as_secs()
                    ),
                );
            }
            self.spent = true;
            let session = new_session();
            self.sessions.insert(session.clone());
            let location = if asked.path.starts_with("/ui/") {
                asked.path.to_string()
            } else {
                "/ui/".to_string()
            };
            return Verdict::SignIn { session, location };
        }
        let session = asked.cookie.unwrap_or("").split(';').find_map(|c| {
            c.trim()
                .strip_prefix(COOKIE)
                .and_then(|rest| rest.strip_prefix('='))
        });
        if !session.is_some_and(|s| self.sessions.iter().any(|ours| same_secret(ours, s))) {
            return refuse(
                401,
                "Not signed in",
                "This browser has no session with this proxy. Open the link `vroom ui` printed (it works once), or run `vroom ui` for a new one.",
            );
        }
        let allowed = asked.path == "/ui"
            || asked.path.starts_with("/ui/")
            || asked.path.starts_with("/v1/")
            || asked.path == "/metrics";
        if !allowed {
            return refuse(
                404,
                "Not found",
                format!("{} is not part of the dashboard.", asked.path),
            );
        }
        Verdict::Forward
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u16 = 8123;
    const HOST: &str = "127.0.0.1:8123";
    const ORIGIN: &str = "http://127.0.0.1:8123";

    fn get(path: &'static str, query: Option<&'static str>) -> Asked<'static> {
        Asked {
            method: "GET",
            path,
            query,
            host: Some(HOST),
            ..Asked::default()
        }
    }

    fn status(v: &Verdict) -> u16 {
        match v {
            Verdict::Forward => 200,
            Verdict::SignIn { .. } => 303,
            Verdict::Refuse { status, .. } => *status,
        }
    }

    /// The link works once, within its time, and the session it gives
    /// opens the dashboard.
    #[test]
    fn a_token_is_spent_once_for_a_session() {
        let t0 = Instant::now();
        let mut access = Access::new(PORT, "secret".into(), t0);
        let session = || "s1".to_string();
        assert_eq!(
            access.decide(&get("/ui/", None), t0, session),
            Verdict::Refuse {
                status: 401,
                title: "Not signed in",
                message: "This browser has no session with this proxy. Open the link `vroom ui` printed (it works once), or run `vroom ui` for a new one.".into()
            }
        );
        assert_eq!(
            status(&access.decide(&get("/ui/", Some("token=wrong")), t0, session)),
            403
        );
        assert_eq!(
            access.decide(&get("/ui/", Some("token=secret")), t0, session),
            Verdict::SignIn {
                session: "s1".into(),
                location: "/ui/".into()
            }
        );
        let again = access.decide(&get("/ui/", Some("token=secret")), t0, session);
        assert!(
            matches!(
                &again,
                Verdict::Refuse {
                    title: "Link already used",
                    status: 403,
                    ..
                }
            ),
            "{again:?}"
        );
        let with = |path: &'static str, cookie: &'static str| Asked {
            cookie: Some(cookie),
            ..get(path, None)
        };
        for (asked, want) in [
            (with("/ui/", "vroom_ui=s1"), 200),
            (with("/ui/instances/w1", "a=b; vroom_ui=s1"), 200),
            (with("/v1/events", "vroom_ui=s1"), 200),
            (with("/metrics", "vroom_ui=s1"), 200),
            (with("/ui/", "vroom_ui=s2"), 401),
            (with("/ui/", "vroom_ui_x=s1"), 401),
            (with("/etc/passwd", "vroom_ui=s1"), 404),
        ] {
            assert_eq!(
                status(&access.decide(&asked, t0, session)),
                want,
                "{asked:?}"
            );
        }
    }

    #[test]
    fn an_expired_token_is_refused() {
        let t0 = Instant::now();
        let mut access = Access::new(PORT, "secret".into(), t0);
        let later = t0 + TOKEN_TTL + Duration::from_secs(1);
        let verdict = access.decide(&get("/ui/", Some("token=secret")), later, || "s".into());
        assert!(
            matches!(
                &verdict,
                Verdict::Refuse {
                    title: "Link expired",
                    status: 403,
                    ..
                }
            ),
            "{verdict:?}"
        );
        // Still unspent, but no less expired.
        let verdict = access.decide(&get("/ui/", Some("token=secret")), later, || "s".into());
        assert_eq!(status(&verdict), 403);
    }

    /// Host and Origin, before anything else: a signed-in browser's cookie
    /// does not carry another site's request.
    #[test]
    fn host_and_origin_table() {
        let t0 = Instant::now();
        let mut access = Access::new(PORT, "secret".into(), t0);
        assert!(matches!(
            access.decide(&get("/ui/", Some("token=secret")), t0, || "s1".into()),
            Verdict::SignIn { .. }
        ));
        let signed_in = |method: &'static str| Asked {
            method,
            path: "/v1/instances/w1/actions",
            host: Some(HOST),
            cookie: Some("vroom_ui=s1"),
            ..Asked::default()
        };
        let cases: Vec<(Asked, u16)> = vec![
            (
                Asked {
                    origin: Some(ORIGIN),
                    ..signed_in("POST")
                },
                200,
            ),
            (
                Asked {
                    origin: Some(ORIGIN),
                    fetch_site: Some("same-origin"),
                    ..signed_in("DELETE")
                },
                200,
            ),
            (
                Asked {
                    host: Some("localhost:8123"),
                    origin: Some("http://localhost:8123"),
                    ..signed_in("POST")
                },
                200,
            ),
            // No Origin on a change: refused (browsers always send one).
            (signed_in("POST"), 403),
            (
                Asked {
                    origin: Some("http://evil.example"),
                    ..signed_in("POST")
                },
                403,
            ),
            (
                Asked {
                    origin: Some("null"),
                    ..signed_in("POST")
                },
                403,
            ),
            (
                Asked {
                    origin: Some("http://localhost:8123"),
                    ..signed_in("POST")
                },
                403,
            ),
            (
                Asked {
                    origin: Some(ORIGIN),
                    fetch_site: Some("cross-site"),
                    ..signed_in("POST")
                },
                403,
            ),
            // GET changes nothing: no Origin needed.
            (signed_in("GET"), 200),
            // The wrong Host, whatever else.
            (
                Asked {
                    host: Some("evil.example:8123"),
                    ..signed_in("GET")
                },
                403,
            ),
            (
                Asked {
                    host: Some("127.0.0.1:9999"),
                    ..signed_in("GET")
                },
                403,
            ),
            (
                Asked {
                    host: None,
                    ..signed_in("GET")
                },
                403,
            ),
        ];
        for (asked, want) in cases {
            assert_eq!(
                status(&access.decide(&asked, t0, || "s2".into())),
                want,
                "{asked:?}"
            );
        }
    }
}
