//! The server on loopback with the built-in model's folder: answers equal the engine's, batched
//! answers equal single ones, streams carry the same text, bad requests get 4xx.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};
use simpleseg_core::segment::Segmentation;
use simpleseg_core::{CoordMode, ParseMode};
use simpleseg_engine::runtime::scheduler::SchedulerOptions;
use simpleseg_engine::{generate, LoadOptions};
use simpleseg_serve::ServeOptions;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> PathBuf {
    root().join("models/simpleseg-tiny")
}

fn demo_image() -> PathBuf {
    root().join("examples/synth/images/synth/demo_0000008.png")
}

fn data_url(path: &std::path::Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// Starts a server on a free port; returns its address once /health says ok.
fn start(options: ServeOptions) -> SocketAddr {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime
            .block_on(simpleseg_serve::serve(
                "127.0.0.1:0".parse().unwrap(),
                options,
                || {
                    Ok(simpleseg_engine::load(
                        &model_dir(),
                        &LoadOptions::default(),
                    )?)
                },
                std::future::pending(),
                move |addr| tx.send(addr).unwrap(),
            ))
            .unwrap();
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).unwrap();
    for _ in 0..600 {
        if let Ok(r) = agent().get(&format!("http://{addr}/health")).call() {
            if r.status() == 200 {
                return addr;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server did not become healthy");
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

fn post(addr: SocketAddr, path: &str, body: &Value) -> (u16, String) {
    let mut r = agent()
        .post(&format!("http://{addr}{path}"))
        .header("Content-Type", "application/json")
        .send_json(body)
        .unwrap();
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().unwrap())
}

fn chat_body(prompt: &str, extra: Value) -> Value {
    let mut body = json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(&demo_image())}},
            {"type": "text", "text": prompt},
        ]}],
        "temperature": 0,
        "max_tokens": 40,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The engine's own answer for a prompt on the demo image.
fn engine_answer(prompt: &str, seed: Option<u64>, max_tokens: usize) -> String {
    let model = simpleseg_engine::load(&model_dir(), &LoadOptions::default()).unwrap();
    let image = simpleseg_core::images::open_image(&demo_image()).unwrap();
    let prepared = model.prepare(&image, prompt).unwrap();
    let mut config = model.generation_config().clone();
    config.max_new_tokens = max_tokens;
    match seed {
        Some(s) => {
            config.do_sample = true;
            config.seed = s;
        }
        None => config.do_sample = false,
    }
    generate(model.as_ref(), &prepared, config, |_| {})
        .unwrap()
        .text
}

/// `data:` payloads of a server-sent event stream, with their event names.
fn sse(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut name = "message".to_string();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event:") {
                    name = n.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            (name, data)
        })
        .filter(|(_, d)| !d.is_empty())
        .collect()
}

const PROMPT: &str = "Output the polygon coordinates of the red shape in the image.";

#[test]
fn chat_and_segment_answer_as_the_engine_does() {
    let addr = start(ServeOptions::default());
    let want = engine_answer(PROMPT, None, 40);
    let (status, text) = post(addr, "/v1/chat/completions", &chat_body(PROMPT, json!({})));
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], want);
    assert_eq!(v["object"], "chat.completion");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    let reason = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length");

    // Streamed: the deltas make the same text, then [DONE].
    let (status, text) = post(
        addr,
        "/v1/chat/completions",
        &chat_body(
            PROMPT,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        ),
    );
    assert_eq!(status, 200);
    let events = sse(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let streamed: String = events
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(streamed, want);
    assert!(text.contains("\"usage\""));

    // Segment: the mask is the answer's, decoded as `decode` does.
    let body = json!({"image": data_url(&demo_image()), "query": "the red shape", "max_tokens": 40, "temperature": 0});
    let (status, text) = post(addr, "/v1/segment", &body);
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["answer"], want);
    let image = simpleseg_core::images::open_image(&demo_image()).unwrap();
    let seg = Segmentation::from_answer(
        &want,
        image.width(),
        image.height(),
        ParseMode::Robust,
        CoordMode::Normalized,
    )
    .unwrap();
    assert_eq!(v["rle"], seg.mask.to_json_value());
    assert_eq!(v["area"], seg.area);
    assert_eq!(v["polygons"], json!(seg.polygons_normalized));

    // The PNG form decodes to the same mask.
    let mut r = agent()
        .post(&format!("http://{addr}/v1/segment?format=png"))
        .send_json(&body)
        .unwrap();
    assert_eq!(r.status(), 200);
    let png = r.body_mut().read_to_vec().unwrap();
    let path = std::env::temp_dir().join(format!("simpleseg-serve-{}.png", std::process::id()));
    std::fs::write(&path, &png).unwrap();
    assert_eq!(simpleseg_core::io::read_mask_png(&path).unwrap(), seg.mask);
    std::fs::remove_file(&path).unwrap();

    // Streamed segment: every point arrives before the result, and they are its polygons'.
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let (_, text) = post(addr, "/v1/segment", &stream_body);
    let events = sse(&text);
    let points: Vec<Value> = events
        .iter()
        .filter(|(n, _)| n == "point")
        .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap()["point"].clone())
        .collect();
    let result: Value = serde_json::from_str(
        &events
            .iter()
            .find(|(n, _)| n == "result")
            .expect("a result")
            .1,
    )
    .unwrap();
    let flat: Vec<Value> = result["polygons"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p.as_array().unwrap().clone())
        .collect();
    assert_eq!(points, flat);
    assert_eq!(result["rle"], v["rle"]);

    // A polygon constraint makes every answer parse, even to an odd prompt.
    let (status, text) = post(
        addr,
        "/v1/chat/completions",
        &chat_body(
            "Describe the image.",
            json!({"constrain": "polygon", "max_tokens": 60}),
        ),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.starts_with("[[["), "{content}");

    // A JSON schema (OpenAI's response_format) and a choice (vLLM's structured_outputs): the
    // answer is a document of that schema, or one of the choices, whatever the model prefers.
    let schema = json!({"type": "object", "properties": {"found": {"type": "boolean"},
        "side": {"enum": ["left", "right"]}}, "required": ["found", "side"]});
    let format =
        json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}});
    let (status, text) = post(
        addr,
        "/v1/chat/completions",
        &chat_body(PROMPT, json!({"response_format": format, "max_tokens": 40})),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let doc: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{content}: {e}"));
    assert!(doc["found"].is_boolean(), "{content}");
    assert!(doc["side"] == "left" || doc["side"] == "right", "{content}");
    let (status, text) = post(
        addr,
        "/v1/chat/completions",
        &chat_body(
            PROMPT,
            json!({"structured_outputs": {"choice": ["a red shape", "a star"]}}),
        ),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content == "a red shape" || content == "a star", "{content}");

    // Models, metrics.
    let mut r = agent()
        .get(&format!("http://{addr}/v1/models"))
        .call()
        .unwrap();
    let models: Value = serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(models["data"][0]["id"], "simpleseg");
    let mut r = agent()
        .get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap();
    let metrics = r.body_mut().read_to_string().unwrap();
    assert!(
        metrics.contains("simpleseg_requests_total{route=\"/v1/chat/completions\",status=\"200\"}")
    );
    assert!(metrics.contains("simpleseg_generated_tokens_total"));
}

#[test]
fn concurrent_requests_get_the_answers_they_get_alone() {
    let addr = start(ServeOptions::default());
    let cases: Vec<(String, Option<u64>)> = vec![
        (PROMPT.into(), None),
        (
            "Output the polygon coordinates of the blue shape in the image.".into(),
            None,
        ),
        (PROMPT.into(), Some(7)),
        ("Where is the green shape?".into(), Some(11)),
    ];
    let want: Vec<String> = cases
        .iter()
        .map(|(p, s)| engine_answer(p, *s, 30))
        .collect();
    let handles: Vec<_> = cases
        .iter()
        .cloned()
        .map(|(prompt, seed)| {
            std::thread::spawn(move || {
                let extra = match seed {
                    Some(s) => json!({"temperature": 1.0, "seed": s, "max_tokens": 30}),
                    None => json!({"max_tokens": 30}),
                };
                let (status, text) = post(addr, "/v1/chat/completions", &chat_body(&prompt, extra));
                assert_eq!(status, 200, "{text}");
                let v: Value = serde_json::from_str(&text).unwrap();
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
        })
        .collect();
    let got: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(got, want);
}

/// The engine's greedy answer with a system message and presence/frequency penalties.
fn engine_answer_with(
    system: Option<&str>,
    presence: f64,
    frequency: f64,
) -> (String, usize, String) {
    let model = simpleseg_engine::load(&model_dir(), &LoadOptions::default()).unwrap();
    let image = simpleseg_core::images::open_image(&demo_image()).unwrap();
    let options = simpleseg_engine::PromptOptions {
        system: system.map(str::to_string),
        ..Default::default()
    };
    let prepared = model.prepare_with(&image, PROMPT, &options).unwrap();
    let mut config = model.generation_config().clone();
    config.max_new_tokens = 40;
    config.do_sample = false;
    config.presence_penalty = presence;
    config.frequency_penalty = frequency;
    let prompt_text = model.tokenizer().decode(&prepared.input_ids).unwrap();
    let out = generate(model.as_ref(), &prepared, config, |_| {}).unwrap();
    (out.text, out.prompt_tokens, prompt_text)
}

#[test]
fn system_messages_and_openai_penalties_are_applied() {
    let addr = start(ServeOptions::default());
    // LangChain's SystemMessage shape: a system turn before the user's.
    let mut body = chat_body(PROMPT, json!({}));
    let user = body["messages"][0].clone();
    body["messages"] = json!([{"role": "system", "content": "You segment objects."}, user]);
    let (status, text) = post(addr, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    let (expected, prompt_tokens, prompt) =
        engine_answer_with(Some("You segment objects."), 0.0, 0.0);
    assert_eq!(answer["choices"][0]["message"]["content"], expected);
    assert_eq!(answer["usage"]["prompt_tokens"], prompt_tokens);
    // The template's default system message is replaced, not kept beside it.
    assert!(prompt.contains("You segment objects."), "{prompt}");
    assert!(!prompt.contains("helpful assistant"), "{prompt}");
    assert!(engine_answer_with(None, 0.0, 0.0)
        .2
        .contains("helpful assistant"));
    // Text parts work as a string does; two system messages, or one after the user's, do not.
    body["messages"][0]["content"] = json!([{"type": "text", "text": "You segment objects."}]);
    let (status, again) = post(addr, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{again}");
    let again: Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["choices"][0]["message"]["content"], expected);
    let two = json!([body["messages"][0], body["messages"][0], user]);
    let after = json!([user, body["messages"][0]]);
    for (messages, needle) in [(two, "one system message"), (after, "before the user")] {
        let mut bad = body.clone();
        bad["messages"] = messages;
        let (status, text) = post(addr, "/v1/chat/completions", &bad);
        assert_eq!(status, 400, "{text}");
        assert!(text.contains(needle), "{text}");
    }
    // Penalties as OpenAI defines them, applied by the engine's sampler.
    let body = chat_body(
        PROMPT,
        json!({"presence_penalty": 1.5, "frequency_penalty": 0.75}),
    );
    let (status, text) = post(addr, "/v1/chat/completions", &body);
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    let (penalized, _, _) = engine_answer_with(None, 1.5, 0.75);
    assert_eq!(answer["choices"][0]["message"]["content"], penalized);
    assert_ne!(penalized, engine_answer_with(None, 0.0, 0.0).0);
}

#[test]
fn bad_requests_get_clear_4xx() {
    let addr = start(ServeOptions {
        api_key: None,
        ..ServeOptions::default()
    });
    let cases = [
        (json!({"messages": []}), 400, "user message"),
        (
            json!({"messages": [{"role": "user", "content": "hello"}]}),
            400,
            "needs an image",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}),
            400,
            "no network",
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}),
            400,
            "allowed-media-path",
        ),
        (
            chat_body(PROMPT, json!({"model": "gpt-4"})),
            404,
            "not served",
        ),
        (
            chat_body(PROMPT, json!({"max_tokens": 0})),
            400,
            "max_tokens",
        ),
        (
            chat_body(PROMPT, json!({"response_format": {"type": "json_schema"}})),
            400,
            "needs",
        ),
        (
            chat_body(PROMPT, json!({"response_format": {"type": "lark"}})),
            400,
            "not supported",
        ),
        (
            chat_body(
                PROMPT,
                json!({"structured_outputs": {"grammar": "start: \"a\""}}),
            ),
            400,
            "grammars are not supported",
        ),
        (
            chat_body(
                PROMPT,
                json!({"response_format": {"type": "regex", "regex": "("}}),
            ),
            400,
            "constraint",
        ),
        (
            // An automaton far over the size limit: refused, not built.
            chat_body(
                PROMPT,
                json!({"response_format": {"type": "regex", "regex": "[ab]*a[ab]{24}"}}),
            ),
            400,
            "constraint",
        ),
    ];
    for (body, status, needle) in cases {
        let (got, text) = post(addr, "/v1/chat/completions", &body);
        assert_eq!(got, status, "{body}: {text}");
        assert!(text.contains(needle), "{text} lacks {needle}");
    }
    // A PNG header claiming 100000 x 100000 pixels: refused before decoding.
    let mut bomb = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(1, 1)
        .write_to(&mut bomb, image::ImageFormat::Png)
        .unwrap();
    let mut bytes = bomb.into_inner();
    bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    );
    let (status, text) = post(addr, "/v1/segment", &json!({"image": url, "query": "x"}));
    assert!(status == 413 || status == 400, "{status} {text}");
    let (status, _) = post(
        addr,
        "/v1/segment",
        &json!({"image": data_url(&demo_image()), "query": "x", "point": [0.1, 0.2]}),
    );
    assert_eq!(status, 400);
    let (status, _) = post(addr, "/v1/nothing", &json!({}));
    assert_eq!(status, 404);
}

#[test]
fn api_key_and_a_full_queue() {
    let addr = start(ServeOptions {
        api_key: Some("sesame".into()),
        scheduler: SchedulerOptions {
            max_batch_rows: 1,
            queue: 1,
        },
        ..ServeOptions::default()
    });
    let (status, _) = post(addr, "/v1/chat/completions", &chat_body(PROMPT, json!({})));
    assert_eq!(status, 401);
    let r = agent()
        .get(&format!("http://{addr}/health"))
        .call()
        .unwrap();
    assert_eq!(r.status(), 200, "health needs no key");
    let r = agent()
        .get(&format!("http://{addr}/v1/models"))
        .header("Authorization", "Bearer sesame")
        .call()
        .unwrap();
    assert_eq!(r.status(), 200);
    // One decoding, one waiting: the rest of a burst is answered 429, and nothing else fails.
    let handles: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                agent()
                    .post(&format!("http://{addr}/v1/chat/completions"))
                    .header("Authorization", "Bearer sesame")
                    .send_json(chat_body(PROMPT, json!({"max_tokens": 64})))
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
}
