//! Text to token ids and back, from the model's `tokenizer.json`, with
//! incremental decoding for streaming output.

use std::path::Path;

use crate::{Error, Result};

/// A model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// The tokenizer of the model in `index`: the one the checkpoint carries
    /// (a GGUF file's vocabulary), else `tokenizer.json` in its directory.
    pub fn for_model(index: &crate::ModelIndex) -> Result<Tokenizer> {
        let Some(json) = index.embedded_tokenizer() else {
            return Tokenizer::from_dir(index.dir());
        };
        let bytes = serde_json::to_vec(json).map_err(|e| Error::Input(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| {
            let file = index.files().first().map(|f| f.path.display().to_string());
            Error::Input(format!(
                "{}: cannot build the tokenizer from tokenizer.ggml.*: {e}",
                file.unwrap_or_default()
            ))
        })?;
        Ok(Tokenizer { inner })
    }

    /// Loads `DIR/tokenizer.json` (a GGUF model's vocabulary: [`for_model`](Self::for_model)).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::model(
                &path,
                "the model has no tokenizer.json; give token ids with --prompt-ids instead",
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::model(&path, format!("cannot load the tokenizer: {e}")))?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`. Special tokens written in the text (e.g. a chat
    /// template's `<|im_start|>`) become their ids; `add_special` adds the
    /// tokenizer's own (e.g. a BOS token).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.inner
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Input(format!("cannot tokenize the prompt: {e}")))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Input(format!("cannot decode tokens: {e}")))
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// Decodes a growing list of ids and hands out only the new text, holding
/// back an incomplete UTF-8 sequence until the token that completes it.
pub struct TextStream<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'t> TextStream<'t> {
    /// A stream over `tok`.
    pub fn new(tok: &'t Tokenizer) -> TextStream<'t> {
        TextStream {
            tok,
            ids: Vec::new(),
            printed: 0,
        }
    }

    /// Adds a token; returns the text it completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed {
            return Ok(String::new());
        }
        let new = text.get(self.printed..).unwrap_or("").to_string();
        self.printed = text.len();
        Ok(new)
    }
}
