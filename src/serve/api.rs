//! The OpenAI request bodies this server reads, and their checks. Fields it
//! does not know are ignored, as OpenAI's own server does with new ones.

use serde::Deserialize;
use serde_json::Value;

use crate::serve::error::ApiError;

/// A chat message's content: a string or a list of parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": ...}, ...]`.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` (the only kind a text model reads).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// One message of `messages`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant`, ...
    pub role: String,
    /// The message; `null` is taken as empty.
    #[serde(default)]
    pub content: Option<Content>,
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Up to four.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// What chat and text completions share.
#[derive(Debug, Clone, Deserialize)]
pub struct CommonParams {
    /// The model asked for.
    pub model: String,
    /// Most new tokens (the older name).
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Most new tokens.
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    /// 0 to 2; default 1.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// (0, 1]; default 1.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Most likely tokens to sample among (-1 or 0: all); not in OpenAI's
    /// API but common to open servers.
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Seed of the sampler; default random.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Choices per request: only 1.
    #[serde(default)]
    pub n: Option<i64>,
    /// Server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Options of the stream.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Keep going past end-of-sequence tokens (for benchmarks).
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// The rest.
    #[serde(flatten)]
    pub common: CommonParams,
}

/// A completion prompt: text, token ids, or a list of one of those.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<i64>),
    /// Several texts (only one is accepted).
    Texts(Vec<String>),
    /// Several token lists (only one is accepted).
    IdLists(Vec<Vec<i64>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// The rest.
    #[serde(flatten)]
    pub common: CommonParams,
}

/// A prompt once the list forms are resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text, tokenized with the tokenizer's special tokens.
    Text(String),
    /// Token ids as given.
    Ids(Vec<u32>),
}

/// Parses a JSON body into `T`, answering OpenAI-style 400s.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(format!(
            "the request body is not valid JSON ({e}); see https://platform.openai.com/docs/api-reference"
        ))
    })?;
    if !v.is_object() {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    }
    serde_json::from_value(v).map_err(|e| {
        let msg = e.to_string();
        let param = msg
            .strip_prefix("missing field `")
            .and_then(|s| s.split('`').next())
            .map(str::to_string);
        ApiError {
            param,
            ..ApiError::invalid(format!("invalid request: {msg}"))
        }
    })
}

impl ChatMessage {
    /// The text of the message (its text parts joined).
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            None => Ok(String::new()),
            Some(Content::Text(t)) => Ok(t.clone()),
            Some(Content::Parts(parts)) => parts
                .iter()
                .map(|p| match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => Ok(t.as_str()),
                    (k, _) => Err(ApiError::invalid_param(
                        "messages",
                        format!("content parts of type {k:?} are not supported by a text model"),
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| v.concat()),
        }
    }
}

impl Prompt {
    /// The one prompt, ids checked against the vocabulary.
    pub fn resolve(&self, vocab: usize) -> Result<PromptInput, ApiError> {
        let ids = |v: &[i64]| -> Result<PromptInput, ApiError> {
            v.iter()
                .map(|&t| {
                    u32::try_from(t)
                        .ok()
                        .filter(|&t| (t as usize) < vocab)
                        .ok_or_else(|| {
                            ApiError::invalid_param(
                                "prompt",
                                format!("token id {t} is outside the vocabulary of {vocab} ids"),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(PromptInput::Ids)
        };
        let one = || ApiError::invalid_param("prompt", "one prompt per request is supported");
        match self {
            Prompt::Text(t) => Ok(PromptInput::Text(t.clone())),
            Prompt::Ids(v) => ids(v),
            Prompt::Texts(v) if v.len() == 1 => Ok(PromptInput::Text(v[0].clone())),
            Prompt::IdLists(v) if v.len() == 1 => ids(&v[0]),
            _ => Err(one()),
        }
    }
}

/// The checked generation settings of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// Most new tokens, if the request said.
    pub max_tokens: Option<usize>,
    /// Temperature.
    pub temperature: f32,
    /// Top-p.
    pub top_p: f32,
    /// Top-k (0: all).
    pub top_k: usize,
    /// Seed, if given.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream the answer.
    pub stream: bool,
    /// Send a usage chunk at the end of the stream.
    pub include_usage: bool,
    /// Ignore end-of-sequence tokens.
    pub ignore_eos: bool,
}

impl CommonParams {
    /// Checks every field's range.
    pub fn check(&self) -> Result<Checked, ApiError> {
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        let max_tokens = match max_tokens {
            Some((name, m)) if m < 1 => {
                return Err(ApiError::invalid_param(
                    name,
                    format!("{name} must be at least 1, not {m}"),
                ))
            }
            Some((_, m)) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature must be between 0 and 2, not {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid_param(
                "top_p",
                format!("top_p must be in (0, 1], not {top_p}"),
            ));
        }
        let top_k = match self.top_k.unwrap_or(0) {
            -1 | 0 => 0,
            k if k > 0 => k as usize,
            k => {
                return Err(ApiError::invalid_param(
                    "top_k",
                    format!("top_k must be -1, 0 (all tokens) or positive, not {k}"),
                ))
            }
        };
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be 1 (one choice per request), not {n}"),
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) if v.len() <= 4 => v.clone(),
            Some(Stop::Many(v)) => {
                return Err(ApiError::invalid_param(
                    "stop",
                    format!("at most 4 stop strings, not {}", v.len()),
                ))
            }
        };
        Ok(Checked {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            seed: self.seed.map(|s| s as u64),
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            ignore_eos: self.ignore_eos.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn bad_bodies_name_their_fault() {
        let e = parse::<ChatRequest>(b"{not json").unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse::<ChatRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{}", e.message);
        let n = -rand::thread_rng().gen_range(1..1000i64);
        let r: ChatRequest =
            parse(format!(r#"{{"model": "m", "messages": [], "max_tokens": {n}}}"#).as_bytes())
                .unwrap();
        let e = r.common.check().unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        assert!(e.message.contains(&n.to_string()));
    }

    #[test]
    fn ranges_and_defaults() {
        let mut rng = rand::thread_rng();
        let k = rng.gen_range(1..100);
        let body = format!(
            r#"{{"model": "m", "prompt": [[1, 2]], "top_k": {k}, "stop": "x", "seed": 5,
                "stream": true, "stream_options": {{"include_usage": true}}}}"#
        );
        let r: CompletionRequest = parse(body.as_bytes()).unwrap();
        let c = r.common.check().unwrap();
        assert_eq!((c.top_k, c.temperature, c.top_p), (k as usize, 1.0, 1.0));
        assert_eq!(c.stop, vec!["x".to_string()]);
        assert!(c.stream && c.include_usage);
        assert_eq!(r.prompt.resolve(3).unwrap(), PromptInput::Ids(vec![1, 2]));
        assert!(r.prompt.resolve(2).is_err());
        for (field, v) in [
            ("temperature", "2.5"),
            ("top_p", "0"),
            ("n", "2"),
            ("top_k", "-3"),
        ] {
            let body = format!(r#"{{"model": "m", "prompt": "a", "{field}": {v}}}"#);
            let r: CompletionRequest = parse(body.as_bytes()).unwrap();
            assert_eq!(r.common.check().unwrap_err().param.as_deref(), Some(field));
        }
    }
}
