//! `simpleseg serve` against hostile clients: requests that ask for unbounded work, bursts of
//! large images, slow and idle connections, paths outside the allowed folder. The server runs
//! as its own process under an address-space limit, so a cost that is not bounded before it is
//! paid fails the test (the process dies) instead of the machine; after each hostile case an
//! ordinary request must still be answered.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};

use common::{fresh_dir, root};

/// Address space for a server with the embedded model.
const SERVER_MEMORY: u64 = 4 << 30;

struct Server {
    child: Child,
    addr: SocketAddr,
    /// The server's own model cache, removed with it.
    cache: std::path::PathBuf,
}

impl Server {
    /// Starts `simpleseg serve --port 0 ARGS` under the address-space limit; returns once
    /// /health answers 200.
    fn start(name: &str, args: &[&str]) -> Server {
        let cache = fresh_dir("hardening-cache", name);
        let mut command = Command::new(env!("CARGO_BIN_EXE_simpleseg"));
        command
            .args(["serve", "--port", "0"])
            .args(args)
            .env("SIMPLESEG_CACHE", &cache)
            .env_remove("SIMPLESEG_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let rlimit = libc::rlimit {
                    rlim_cur: SERVER_MEMORY,
                    rlim_max: SERVER_MEMORY,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &rlimit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        // "serving NAME on http://ADDR (loading the model...)"
        let mut seen = Vec::new();
        let addr = loop {
            let mut byte = [0u8; 1];
            assert_eq!(
                stderr.read(&mut byte).unwrap(),
                1,
                "the server exited: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.push(byte[0]);
            let text = String::from_utf8_lossy(&seen);
            if let Some(rest) = text.split("http://").nth(1) {
                if let Some(addr) = rest.split(' ').next().filter(|_| rest.contains(' ')) {
                    break addr.parse::<SocketAddr>().unwrap();
                }
            }
        };
        // Keep reading the server's messages so it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        let server = Server { child, addr, cache };
        for _ in 0..600 {
            if server.get("/health").0 == 200 {
                return server;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not become healthy");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn get(&self, path: &str) -> (u16, String) {
        match agent().get(&self.url(path)).call() {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(_) => (0, String::new()),
        }
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let mut r = agent()
            .post(&self.url(path))
            .header("Content-Type", "application/json")
            .send_json(body)
            .unwrap();
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The process's peak resident memory (VmHWM), in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            * 1024
    }

    /// Fails unless the process is alive and answers an ordinary request.
    fn assert_serving(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "the server died");
        let (status, body) = self.post("/v1/segment", &segment_body(json!({})));
        assert_eq!(status, 200, "{body}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.cache);
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

fn data_url(bytes: &[u8], kind: &str) -> String {
    format!(
        "data:image/{kind};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn demo_image() -> String {
    let path = root().join("examples/synth/images/synth/demo_0000008.png");
    data_url(&std::fs::read(path).unwrap(), "png")
}

fn segment_body(extra: Value) -> Value {
    let mut body = json!({"image": demo_image(), "query": "the red shape", "temperature": 0, "max_tokens": 24});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn chat_body(text: &str, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": demo_image()}},
            {"type": "text", "text": text},
        ]}],
        "temperature": 0,
        "max_tokens": 16,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn message(body: &Value) -> String {
    body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Every case asks for unbounded work in a small request: each gets a 4xx naming the limit,
/// and the server goes on answering.
#[test]
fn one_small_request_cannot_take_the_server_down() {
    let mut server = Server::start("small", &[]);
    let recursive = |props: usize| {
        let properties: serde_json::Map<String, Value> = (0..props)
            .map(|i| (format!("p{i}"), json!({"$ref": "#/$defs/n"})))
            .collect();
        json!({"type": "json_schema", "json_schema": {"name": "n", "schema": {
            "$defs": {"n": {"type": "object", "properties": properties}}, "$ref": "#/$defs/n"}}})
    };
    let words = "one ".repeat(8000);
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "C1 recursive schema",
            chat_body("x", json!({"response_format": recursive(3)})),
            400,
            "would take up to",
        ),
        (
            "C1 four properties",
            chat_body("x", json!({"response_format": recursive(4)})),
            400,
            "would take up to",
        ),
        (
            "C1 25 MB regex",
            chat_body(
                "x",
                json!({"response_format": {"type": "regex", "regex": "a".repeat(25 << 20)}}),
            ),
            400,
            "at most 65536",
        ),
        (
            "C2 pixels",
            segment_body(json!({"min_pixels": 4_000_000, "max_pixels": 4_000_000})),
            400,
            "above this server's limit",
        ),
        (
            "C2 processor kwargs",
            chat_body(
                "x",
                json!({"mm_processor_kwargs": {"max_pixels": 6_000_000}}),
            ),
            400,
            "above this server's limit",
        ),
        (
            "C2 unknown kwargs",
            chat_body("x", json!({"mm_processor_kwargs": {"do_resize": false}})),
            400,
            "not supported",
        ),
        (
            "C3 long chat",
            chat_body(&words, json!({})),
            400,
            "maximum context length is 2048",
        ),
        (
            "C3 long template",
            segment_body(
                json!({"prompt_template": format!("{} {{query}}", "word ".repeat(15_000))}),
            ),
            400,
            "the prompt template makes a prompt",
        ),
        (
            "C3 repeated query",
            segment_body(json!({"prompt_template": "{query}".repeat(100_000)})),
            400,
            "the prompt template makes a prompt",
        ),
        (
            "C3 max_tokens",
            segment_body(json!({"max_tokens": 20_000})),
            400,
            "in the completion",
        ),
        (
            "M1 many stops",
            chat_body("x", json!({"stop": vec!["x"; 17]})),
            400,
            "at most 16 strings",
        ),
        (
            "M1 long stop",
            chat_body("x", json!({"stop": "x".repeat(300)})),
            400,
            "at most 256 bytes",
        ),
        (
            "M3 no first token",
            chat_body(
                "x",
                json!({"response_format": {"type": "regex", "regex": "\\x{10FFFF}"}}),
            ),
            400,
            "can begin an answer",
        ),
        (
            "M3 tiny temperature",
            chat_body("x", json!({"temperature": 1e-300})),
            400,
            "temperature must be at least",
        ),
        (
            "unknown field",
            chat_body("x", json!({"frobnicate": 1})),
            400,
            "unknown field 'frobnicate'",
        ),
        (
            "logprobs",
            chat_body("x", json!({"logprobs": true})),
            400,
            "'logprobs' is not supported",
        ),
        (
            "top_logprobs",
            chat_body("x", json!({"top_logprobs": 3})),
            400,
            "'top_logprobs' is not supported",
        ),
        (
            "penalty out of range",
            chat_body("x", json!({"presence_penalty": 2.5})),
            400,
            "presence_penalty must be in [-2, 2]",
        ),
    ];
    for (case, body, status, needle) in cases {
        let (got, answer) = server.post(
            if body.get("messages").is_some() {
                "/v1/chat/completions"
            } else {
                "/v1/segment"
            },
            &body,
        );
        assert_eq!(got, status, "{case}: {answer}");
        assert!(message(&answer).contains(needle), "{case}: {answer}");
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "{case}: the server died"
        );
    }
    // Neutral values of the OpenAI options are accepted.
    let (status, answer) = server.post(
        "/v1/chat/completions",
        &chat_body(
            "x",
            json!({"logprobs": false, "top_logprobs": 0, "user": "u1", "tools": []}),
        ),
    );
    assert_eq!(status, 200, "{answer}");
    // M3: a constraint that runs into a character no token writes stops with an error
    // finish reason, never with an unchecked token.
    let (status, answer) = server.post(
        "/v1/chat/completions",
        &chat_body(
            "x",
            json!({"response_format": {"type": "regex", "regex": "\\[\\x{10FFFF}"}}),
        ),
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "error", "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "[", "{answer}");
    // M2: a pattern that failed to build fails from the cache after, without a second build.
    let metric = |text: &str, name: &str| -> usize {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    let explosive = chat_body(
        "x",
        json!({"response_format": {"type": "regex", "regex": "(a|b)*a(a|b){30}"}}),
    );
    let (status, answer) = server.post("/v1/chat/completions", &explosive);
    assert_eq!(status, 400, "{answer}");
    let before = server.get("/metrics").1;
    let (status, again) = server.post("/v1/chat/completions", &explosive);
    assert_eq!((status, message(&again)), (400, message(&answer)));
    let after = server.get("/metrics").1;
    assert_eq!(
        metric(&after, "simpleseg_constraint_builds_total"),
        metric(&before, "simpleseg_constraint_builds_total")
    );
    assert_eq!(
        metric(&after, "simpleseg_constraint_cache_hits_total"),
        metric(&before, "simpleseg_constraint_cache_hits_total") + 1
    );
    server.assert_serving();
    let metrics = server.get("/metrics").1;
    assert!(metrics.contains("simpleseg_running_rows 0"), "{metrics}");
    eprintln!("peak RSS: {} MB", server.peak_rss() >> 20);
}

/// Security headers, the Host check on loopback, the key compared whole in any case.
#[test]
fn headers_hosts_and_keys() {
    let server = Server::start("hosts", &[]);
    let response = agent().get(&server.url("/")).call().unwrap();
    let headers = response.headers();
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));
    // DNS rebinding: a page elsewhere reaching 127.0.0.1 through its own name.
    let evil = agent()
        .get(&server.url("/v1/models"))
        .header("Host", "evil.example")
        .call()
        .unwrap();
    assert_eq!(evil.status().as_u16(), 403);
    let local = agent()
        .get(&server.url("/v1/models"))
        .header("Host", format!("localhost:{}", server.addr.port()))
        .call()
        .unwrap();
    assert_eq!(local.status().as_u16(), 200);

    let keyed = Server::start("key", &["--api-key", "k3y"]);
    for (value, status) in [
        ("Bearer k3y", 200),
        ("bearer k3y", 200),
        ("Bearer k3", 401),
        ("Bearer k3yk3y", 401),
    ] {
        let r = agent()
            .get(&keyed.url("/v1/models"))
            .header("Authorization", value)
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{value}");
    }
    // The page and its icon need no key.
    assert_eq!(keyed.get("/").0, 200);
    assert_eq!(keyed.get("/favicon.ico").0, 204);
    // With a key, other host names are the key's business.
    let r = agent()
        .get(&keyed.url("/health"))
        .header("Host", "gpu-box.internal")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    for env in [false, true] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_simpleseg"));
        command.args(["serve", "--port", "0"]);
        if env {
            command.env("SIMPLESEG_API_KEY", "");
        } else {
            command.args(["--api-key", ""]);
        }
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("the API key is empty"));
    }
}

/// A 13000 x 13000 PNG of a few hundred KB, streamed through the encoder row by row.
fn huge_png() -> Vec<u8> {
    let side = 13_000;
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, side, side);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_compression(png::Compression::Fastest);
    {
        let mut writer = encoder.write_header().unwrap();
        let mut stream = writer.stream_writer().unwrap();
        let row = vec![0u8; side as usize];
        for _ in 0..side {
            stream.write_all(&row).unwrap();
        }
        stream.finish().unwrap();
        writer.finish().unwrap();
    }
    out
}

/// H1: sixteen clients at once, each with a picture that takes hundreds of MB to decode,
/// against a queue of 8: the surplus is refused before its body is read, and decoding waits
/// for the image memory budget.
#[test]
fn bursts_of_large_images_are_refused_before_they_cost_memory() {
    let mut server = Server::start("burst", &["--queue", "8", "--image-memory", "1073741824"]);
    let body = std::sync::Arc::new(segment_body(json!({"image": data_url(&huge_png(), "png")})));
    let started = Instant::now();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let body = body.clone();
            let url = server.url("/v1/segment");
            std::thread::spawn(move || {
                let mut r = agent()
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .send_json(&*body)
                    .unwrap();
                let retry = r.headers().get("retry-after").is_some();
                let _ = r.body_mut().read_to_string();
                (r.status().as_u16(), retry)
            })
        })
        .collect();
    let results: Vec<(u16, bool)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let count = |s| results.iter().filter(|(c, _)| *c == s).count();
    eprintln!(
        "16 requests in {:.1} s: {} x 200, {} x 429, {} x 503; peak RSS {} MB",
        started.elapsed().as_secs_f64(),
        count(200),
        count(429),
        count(503),
        server.peak_rss() >> 20
    );
    assert!(
        results.iter().all(|(s, _)| [200, 429, 503].contains(s)),
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .filter(|(s, _)| *s != 200)
            .all(|(_, retry)| *retry),
        "{results:?}"
    );
    assert!(count(429) + count(503) >= 1, "{results:?}");
    server.assert_serving();
}

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection (or the read times out: an error).
fn read_to_close(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// H3: clients that send headers slowly, stay idle, or are too many are cut off; shutdown
/// does not wait on them; a client that half-closes still gets its answer.
#[test]
fn slow_idle_and_surplus_connections_are_closed() {
    let mut server = Server::start(
        "connections",
        &[
            "--header-timeout",
            "2",
            "--max-connections",
            "6",
            "--shutdown-timeout",
            "3",
        ],
    );
    // A byte every half second: closed once the header time is up.
    let mut slow = connect(&server);
    let start = Instant::now();
    slow.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let mut closed = false;
    for _ in 0..40 {
        if slow.write_all(b"X").is_err() {
            closed = true;
            break;
        }
        let mut probe = [0u8; 256];
        slow.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        match slow.read(&mut probe) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(
        closed,
        "a slow client kept its connection for {:?}",
        start.elapsed()
    );
    // Headers larger than the server buffers are refused.
    let mut big = connect(&server);
    let _ = big.write_all(
        format!(
            "GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
            "a".repeat(200_000)
        )
        .as_bytes(),
    );
    let answer = read_to_close(&mut big).unwrap_or_default();
    assert!(!answer.contains("200 OK"), "{answer}");
    // Six idle connections fill the server; the seventh is told to come back. A connection
    // closed above may hold its slot a moment longer than its client sees, so an idle one
    // can be refused at once: it is replaced, until six are open and unanswered.
    let mut idle: Vec<TcpStream> = Vec::new();
    for _ in 0..50 {
        while idle.len() < 6 {
            idle.push(connect(&server));
        }
        std::thread::sleep(Duration::from_millis(100));
        idle.retain(|stream| {
            stream.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            let open = matches!(
                (&*stream).read(&mut byte),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            );
            stream.set_nonblocking(false).unwrap();
            open
        });
        if idle.len() == 6 {
            break;
        }
    }
    assert_eq!(idle.len(), 6, "idle connections were refused");
    // (The server gives its 503 a second to be written: on a machine too busy for that, the
    // connection closes with nothing, and the next one is tried.)
    let mut answer = String::new();
    for _ in 0..3 {
        let mut surplus = connect(&server);
        answer = read_to_close(&mut surplus).unwrap();
        if !answer.is_empty() {
            break;
        }
    }
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    // Idle connections time out too, and make room.
    std::thread::sleep(Duration::from_secs(3));
    drop(idle);
    assert_eq!(server.get("/health").0, 200);
    // Half-closed: the request, then the client's end of the connection closed.
    let mut half = connect(&server);
    half.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    let answer = read_to_close(&mut half).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    server.assert_serving();
    // SIGTERM with a connection that never finishes its headers: the server still exits.
    let mut partial = connect(&server);
    partial
        .write_all(b"GET /health HTTP/1.1\r\nHost: loc")
        .unwrap();
    let start = Instant::now();
    // SAFETY: sends a signal to our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "shutdown hangs");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    drop(partial);
}

/// `file://` URLs: only regular files under the allowed folder, with the same answer for a
/// path outside whether or not it exists, and percent-escapes decoded.
#[test]
fn file_urls_stay_inside_the_allowed_folder() {
    let dir = fresh_dir("hardening", "media");
    let allowed = dir.join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let image = root().join("examples/synth/images/synth/demo_0000008.png");
    std::fs::copy(&image, allowed.join("my photo.png")).unwrap();
    std::fs::copy(&image, dir.join("outside.png")).unwrap();
    let fifo = allowed.join("pipe.png");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let server = Server::start(
        "media",
        &["--allowed-media-path", allowed.to_str().unwrap()],
    );
    let url = |p: &Path| format!("file://{}", p.display()).replace(' ', "%20");
    let ask = |p: &Path| server.post("/v1/segment", &segment_body(json!({"image": url(p)})));
    let (status, body) = ask(&allowed.join("my photo.png"));
    assert_eq!(status, 200, "{body}");
    let (s1, b1) = ask(&dir.join("outside.png"));
    let (s2, b2) = ask(&dir.join("missing.png"));
    let (s3, b3) = ask(&allowed.join("../outside.png"));
    assert_eq!((s1, s2, s3), (403, 403, 403), "{b1} {b2} {b3}");
    let shape = |b: &Value| {
        message(b)
            .replace(dir.to_str().unwrap(), "")
            .replace("outside", "X")
            .replace("missing", "X")
    };
    assert_eq!(
        shape(&b1),
        shape(&b2),
        "an outside path's existence does not show"
    );
    let start = Instant::now();
    let (status, body) = ask(&fifo);
    assert_eq!(status, 403, "{body}");
    assert!(message(&body).contains("not a regular file"), "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "a FIFO held the request"
    );
}

/// `segment --json` and `/v1/segment` answer with one JSON form: the same fields, spelled the
/// same, with the same values for the same request (the CLI adds the files it wrote).
#[test]
fn segment_json_and_the_server_agree() {
    let dir = fresh_dir("hardening", "json");
    let image = root().join("examples/synth/images/synth/demo_0000008.png");
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .args([
            "segment",
            "--image",
            image.to_str().unwrap(),
            "--query",
            "the red shape",
            "--greedy",
            "--json",
        ])
        .args(["--rle-out", dir.join("m.json").to_str().unwrap()])
        .env("SIMPLESEG_CACHE", fresh_dir("hardening-cache", "json-cli"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    let server = Server::start("json", &[]);
    let (status, api) = server.post(
        "/v1/segment",
        &json!({"image": data_url(&std::fs::read(&image).unwrap(), "png"), "query": "the red shape", "temperature": 0}),
    );
    assert_eq!(status, 200, "{api}");
    let keys = |v: &Value| -> std::collections::BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    };
    let mut cli_keys = keys(&cli);
    assert!(cli_keys.remove("written"));
    assert_eq!(cli_keys, keys(&api));
    for key in [
        "answer",
        "prompt",
        "polygons",
        "polygons_pixels",
        "rle",
        "bbox",
        "area",
        "width",
        "height",
        "mode",
        "coords",
        "warnings",
        "boxes",
        "points",
        "token_ids",
        "stop_reason",
        "finish_reason",
        "usage",
    ] {
        assert_eq!(cli[key], api[key], "{key}");
    }
}
