//! A model folder's chat template, rendered as transformers renders it.

use serde_json::{json, Value};

use simpleseg_core::limits::{read_text_file_bounded, Limit};

use crate::error::{Error, Result};
use crate::io::hf::HfFolder;

/// A chat template in transformers' Jinja dialect.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    /// Where the template came from, for error messages.
    origin: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// The most work a chat template may do for one rendering (minijinja's fuel units).
pub const TEMPLATE_FUEL: u64 = 10_000_000;

impl ChatTemplate {
    /// The template a processor uses: `chat_template.jinja`, else `chat_template.json`, else
    /// the `chat_template` of `tokenizer_config.json` (a string, or a list of named templates
    /// whose "default" is taken).
    pub fn load(folder: &HfFolder) -> Result<Self> {
        let tokenizer_config = folder.optional_json("tokenizer_config.json")?;
        let (bos_token, eos_token) = tokenizer_config.as_ref().map_or((None, None), |t| {
            (
                token_string(t.root.get("bos_token")),
                token_string(t.root.get("eos_token")),
            )
        });
        let jinja = folder.path("chat_template.jinja");
        let (source, origin) = if jinja.is_file() {
            let text = read_text_file_bounded(&jinja, Limit::DataBytes)?;
            (text, jinja.display().to_string())
        } else if let Some(file) = folder.optional_json("chat_template.json")? {
            let text = file
                .str(&["chat_template"])
                .ok_or_else(|| file.error("missing the \"chat_template\" string"))?
                .to_string();
            (text, file.path.display().to_string())
        } else if let Some(file) = tokenizer_config
            .as_ref()
            .filter(|t| t.root.get("chat_template").is_some())
        {
            let text = match &file.root["chat_template"] {
                Value::String(s) => s.clone(),
                Value::Array(list) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .ok_or_else(|| {
                        file.error("`chat_template` list has no template named \"default\"")
                    })?
                    .to_string(),
                _ => {
                    return Err(
                        file.error("`chat_template` must be a string or a list of named templates")
                    )
                }
            };
            (text, file.path.display().to_string())
        } else {
            return Err(Error::MissingFile {
                path: jinja,
                hint: "no chat template: expected chat_template.jinja, chat_template.json or a \"chat_template\" in tokenizer_config.json".into(),
            });
        };
        Ok(ChatTemplate {
            source,
            origin,
            bos_token,
            eos_token,
        })
    }

    /// A template from its source text.
    pub fn from_source(source: impl Into<String>) -> Self {
        ChatTemplate {
            source: source.into(),
            origin: "template".into(),
            bos_token: None,
            eos_token: None,
        }
    }

    /// The template's source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (transformers' message dicts); a template that runs out of
    /// [`TEMPLATE_FUEL`] is an error.
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    message,
                ))
            },
        );
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Templates come with downloaded model folders: a bounded amount of work, so that a
        // hostile one cannot loop for ever (real chat templates use a few thousand units).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Template(format!("{}: {e}", self.origin)))?;
        let template = env
            .get_template("chat")
            .map_err(|e| Error::Template(format!("{}: {e}", self.origin)))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
            })
            .map_err(|e| Error::Template(format!("{}: {e}", self.origin)))
    }

    /// One user turn holding an image followed by a text prompt, as the official example builds
    /// it, after a system message when one is given (without, the template's own default).
    pub fn image_prompt(&self, prompt: &str, system: Option<&str>) -> Result<String> {
        let user = json!({
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": prompt}],
        });
        let messages = match system {
            Some(system) => json!([{"role": "system", "content": system}, user]),
            None => json!([user]),
        };
        self.render(&messages, true)
    }
}
