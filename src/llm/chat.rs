//! Chat prompts: the model's chat template (from `tokenizer_config.json`)
//! rendered with minijinja, as transformers' `apply_chat_template` does.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with this role and text.
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// A chat template with the special tokens it refers to.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// A token entry of tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of `DIR/tokenizer_config.json` (or `DIR/chat_template.jinja`),
    /// `None` when the model has none.
    /// (A GGUF model's template: [`for_model`](Self::for_model).)
    pub fn from_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let path = dir.join("tokenizer_config.json");
        let cfg: Value = match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| Error::model(&path, format!("invalid JSON: {e}")))?,
            Err(_) => Value::Null,
        };
        let source = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(source.map(|source| ChatTemplate {
            source,
            bos_token: token_text(cfg.get("bos_token")),
            eos_token: token_text(cfg.get("eos_token")),
        }))
    }

    /// The template of the model in `index`: the one the checkpoint carries
    /// (GGUF `tokenizer.chat_template`), else [`from_dir`](Self::from_dir).
    pub fn for_model(index: &crate::ModelIndex) -> Result<Option<ChatTemplate>> {
        match index.embedded_chat_template() {
            Some((source, bos, eos)) => Ok(Some(ChatTemplate::new(source, bos, eos))),
            None => ChatTemplate::from_dir(index.dir()),
        }
    }

    /// A template from its source.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> ChatTemplate {
        ChatTemplate {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        }
    }

    /// Renders `messages`, ending with the assistant's turn header when
    /// `add_generation_prompt`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        // Python methods templates call (`strip`, `startswith`, `get`, `items`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date"; a fixed rendering keeps
            // prompts reproducible.
            fmt.replace("%d", "01")
                .replace("%m", "01")
                .replace("%b", "Jan")
                .replace("%B", "January")
                .replace("%Y", "2025")
        });
        env.add_template("chat", &self.source)
            .map_err(|e| Error::Input(format!("invalid chat template: {e}")))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| Error::Input(format!("invalid chat template: {e}")))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| Error::Input(format!("rendering the chat template: {e}")))
    }
}

/// The messages of a JSON file: a list of `{"role", "content"}` objects.
pub fn read_messages(path: &Path) -> Result<Vec<Message>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, None, e))?;
    serde_json::from_str(&text).map_err(|e| {
        Error::Input(format!(
            "{}: expected a JSON list of {{\"role\", \"content\"}} messages: {e}",
            path.display()
        ))
    })
}
