//! Where answers come from: a local model, an OpenAI-compatible server (vLLM, SGLang, our own
//! server), or a file of answers produced elsewhere.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use simpleseg_core::images::open_image;
use simpleseg_core::limits::{read_text_file_bounded, Limit};
use simpleseg_core::segment::Target;
use simpleseg_engine::runtime::segment::{segment, SegmentOptions};
use simpleseg_engine::{GenerationConfig, VisionLanguageModel};

use crate::error::{Error, Result};

/// One question to answer.
#[derive(Clone, Debug)]
pub struct Question<'a> {
    pub ref_id: u64,
    pub sent_id: u64,
    pub image: &'a Path,
    pub prompt: &'a str,
    /// `Some` to sample with this seed; `None` for greedy decoding.
    pub seed: Option<u64>,
}

/// Produces answers.
pub trait Backend: Send + Sync {
    fn answer(&self, q: &Question) -> Result<String>;
    /// What to record about the backend in reports.
    fn describe(&self) -> Value;
    /// What about the backend changes answers; a resumed evaluation must have the same.
    fn identity(&self) -> Value {
        self.describe()
    }
}

/// A model run in this process.
pub struct LocalBackend {
    model: Box<dyn VisionLanguageModel>,
    config: GenerationConfig,
    name: String,
    files: Value,
    quantize: Option<String>,
    grammar: Option<std::sync::Arc<simpleseg_engine::runtime::constraint::Grammar>>,
}

impl LocalBackend {
    /// `config` is used as given, except that `do_sample`/`seed` follow each question.
    /// `name` is how reports name the model; `files` identifies its weights and settings
    /// (e.g. `HfFolder::fingerprint`), so that a resumed evaluation can tell another model.
    pub fn new(
        model: Box<dyn VisionLanguageModel>,
        config: GenerationConfig,
        name: impl Into<String>,
        files: Value,
    ) -> Self {
        LocalBackend {
            model,
            config,
            name: name.into(),
            files,
            quantize: None,
            grammar: None,
        }
    }

    /// Holds every answer to `grammar` (constrained decoding).
    pub fn constrained(
        mut self,
        grammar: Option<std::sync::Arc<simpleseg_engine::runtime::constraint::Grammar>>,
    ) -> Self {
        self.grammar = grammar;
        self
    }

    /// Records that the model's linear layers were quantized at load to `format`.
    pub fn quantized(mut self, format: Option<&str>) -> Self {
        self.quantize = format.map(str::to_string);
        self
    }
}

impl Backend for LocalBackend {
    fn answer(&self, q: &Question) -> Result<String> {
        let image = open_image(q.image)?;
        let mut config = self.config.clone();
        match q.seed {
            Some(seed) => {
                config.do_sample = true;
                config.seed = seed;
            }
            None => config.do_sample = false,
        }
        // The engine's segmentation pipeline; the runner scores the answer against the
        // annotation (at its size, with the evaluation's parse mode).
        let result = segment(
            self.model.as_ref(),
            &image,
            &Target::Question(q.prompt.to_string()),
            &config,
            self.grammar.clone(),
            &SegmentOptions::default(),
            |_| {},
        )?;
        Ok(result.output.text)
    }

    fn describe(&self) -> Value {
        let mut description = self.identity();
        description["model"] = json!(self.name);
        description
    }

    fn identity(&self) -> Value {
        let c = &self.config;
        let mut identity = json!({
            "backend": "local",
            "architecture": self.model.architecture(),
            "dtype": self.model.dtype().as_str(),
            "model_files": self.files,
            "max_new_tokens": c.max_new_tokens,
            "repetition_penalty": c.repetition_penalty,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "top_k": c.top_k,
            "eos_token_ids": c.eos_token_ids,
        });
        // Recorded when used, so that runs made before these options existed still resume.
        for (name, value) in [
            ("presence_penalty", c.presence_penalty),
            ("frequency_penalty", c.frequency_penalty),
        ] {
            if value != 0.0 {
                identity[name] = json!(value);
            }
        }
        if let Some(q) = &self.quantize {
            identity["quantize"] = json!(q);
        }
        if let Some(g) = &self.grammar {
            identity["constrain"] = json!(g.name());
        }
        identity
    }
}

/// An OpenAI-compatible chat-completions server.
pub struct OpenAiBackend {
    agent: ureq::Agent,
    url: String,
    model: String,
    api_key: Option<String>,
    max_tokens: usize,
    temperature: f64,
    retries: usize,
}

impl OpenAiBackend {
    /// `base_url` is the API root (e.g. `http://localhost:8000/v1`); requests go to
    /// `{base_url}/chat/completions`. Sampled questions use `temperature`; greedy ones 0.
    pub fn new(
        base_url: &str,
        model: &str,
        api_key: Option<String>,
        max_tokens: usize,
        temperature: f64,
        timeout: Duration,
        retries: usize,
    ) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .new_agent();
        OpenAiBackend {
            agent,
            url: format!("{}/chat/completions", base_url.trim_end_matches('/')),
            model: model.to_string(),
            api_key,
            max_tokens,
            temperature,
            retries,
        }
    }

    fn request(&self, body: &Value) -> std::result::Result<String, (bool, String)> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        if let Some(key) = &self.api_key {
            req = req.header("Authorization", &format!("Bearer {key}"));
        }
        let mut response = req
            .send_json(body)
            .map_err(|e| (true, format!("request failed: {e}")))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| (true, format!("reading the response failed: {e}")))?;
        if status != 200 {
            // Retry on overload and server errors; a 4xx other than 429 will not get better.
            let retry = status == 429 || status >= 500;
            return Err((
                retry,
                format!(
                    "HTTP {status}: {}",
                    text.chars().take(300).collect::<String>()
                ),
            ));
        }
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| (false, format!("response is not JSON: {e}")))?;
        value["choices"][0]["message"]["content"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| {
                (
                    false,
                    format!(
                        "no choices[0].message.content in {}",
                        text.chars().take(300).collect::<String>()
                    ),
                )
            })
    }
}

/// The MIME type of an image file from its first bytes.
fn mime_of(bytes: &[u8]) -> &'static str {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if bytes.starts_with(b"\x89PNG") {
        "image/png"
    } else if bytes.starts_with(b"GIF8") {
        "image/gif"
    } else if bytes.len() > 12 && &bytes[8..12] == b"WEBP" {
        "image/webp"
    } else {
        "application/octet-stream"
    }
}

/// The image as a `data:` URL, after the checks every image read passes (file size, the
/// dimensions in its header).
pub fn data_url(path: &Path) -> Result<String> {
    simpleseg_core::images::image_dimensions(path)?;
    let bytes = simpleseg_core::images::read_image_file(path)?;
    Ok(format!(
        "data:{};base64,{}",
        mime_of(&bytes),
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    ))
}

impl Backend for OpenAiBackend {
    fn answer(&self, q: &Question) -> Result<String> {
        let mut body = json!({
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(q.image)?}},
                {"type": "text", "text": q.prompt},
            ]}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
        });
        if let Some(seed) = q.seed {
            body["temperature"] = json!(self.temperature);
            body["seed"] = json!(seed);
        }
        let mut last = String::new();
        for attempt in 0..=self.retries {
            match self.request(&body) {
                Ok(text) => return Ok(text),
                Err((retry, message)) => {
                    last = message;
                    if !retry {
                        break;
                    }
                    if attempt < self.retries {
                        std::thread::sleep(Duration::from_millis(200 << attempt.min(6)));
                    }
                }
            }
        }
        Err(Error::Backend(format!("{}: {last}", self.url)))
    }

    fn describe(&self) -> Value {
        json!({
            "backend": "openai",
            "url": self.url,
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        })
    }
}

/// Answers read from a JSON lines file of `{"ref_id", "sent_id", "answer"}`.
pub struct FileBackend {
    path: PathBuf,
    /// The file's identity when it was read.
    digest: Value,
    answers: HashMap<(u64, u64), String>,
}

impl FileBackend {
    pub fn open(path: &Path) -> Result<Self> {
        let text = read_text_file_bounded(path, Limit::DataBytes)?;
        let mut answers = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |m: &str| Error::BadFile {
                path: path.to_path_buf(),
                message: format!("line {}: {m}", n + 1),
            };
            let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
            let id = |k: &str| {
                v[k].as_u64()
                    .ok_or_else(|| bad(&format!("missing integer `{k}`")))
            };
            let answer = v["answer"]
                .as_str()
                .ok_or_else(|| bad("missing string `answer`"))?;
            answers.insert((id("ref_id")?, id("sent_id")?), answer.to_string());
        }
        Ok(FileBackend {
            path: path.to_path_buf(),
            digest: simpleseg_core::io::fingerprint(path)?,
            answers,
        })
    }
}

impl Backend for FileBackend {
    fn answer(&self, q: &Question) -> Result<String> {
        self.answers
            .get(&(q.ref_id, q.sent_id))
            .cloned()
            .ok_or_else(|| {
                Error::Backend(format!(
                    "{} has no answer for ref_id {} sent_id {}",
                    self.path.display(),
                    q.ref_id,
                    q.sent_id
                ))
            })
    }

    fn describe(&self) -> Value {
        json!({"backend": "file", "predictions": self.path, "file": self.digest})
    }

    fn identity(&self) -> Value {
        json!({"backend": "file", "file": self.digest})
    }
}
