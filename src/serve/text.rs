//! Turning a request's tokens into text as they come: incremental decoding
//! that holds back an incomplete UTF-8 character, and `stop` strings, which
//! end the text before they start and may span tokens.

use std::sync::Arc;

use crate::llm::Tokenizer;
use crate::Result;

/// The text of one request's tokens so far.
pub struct TextAssembler {
    tok: Arc<Tokenizer>,
    ids: Vec<u32>,
    stops: Vec<String>,
    /// Bytes of the decoded text already handed out.
    emitted: usize,
    /// Whether a stop string was found.
    stopped: bool,
}

impl TextAssembler {
    /// An assembler that ends the text at the first of `stops`.
    pub fn new(tok: Arc<Tokenizer>, stops: Vec<String>) -> TextAssembler {
        TextAssembler {
            tok,
            ids: Vec::new(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Tokens pushed so far.
    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Adds a token; returns the text that can be handed out now (possibly
    /// empty). After a stop string, nothing more.
    pub fn push(&mut self, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let text = self.tok.decode(&self.ids)?;
        Ok(self.advance(&text, false))
    }

    /// The text not handed out yet, once no token follows.
    pub fn finish(&mut self) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = self.tok.decode(&self.ids)?;
        Ok(self.advance(&text, true))
    }

    /// Hands out `text[emitted..end]`, where `end` is a stop string's start,
    /// or else as far as no stop string or incomplete character could
    /// still change it (all of it when `last`).
    fn advance(&mut self, text: &str, last: bool) -> String {
        if text.len() < self.emitted || !text.is_char_boundary(self.emitted) {
            // The decoding of earlier tokens changed; wait for it to settle.
            return String::new();
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let found = self
            .stops
            .iter()
            .filter_map(|s| text[from..].find(s.as_str()).map(|p| from + p))
            .min();
        let end = if let Some(p) = found {
            self.stopped = true;
            p.max(self.emitted)
        } else if last {
            text.len()
        } else if text.ends_with('\u{FFFD}') {
            self.emitted
        } else {
            // A stop string could start in the last `longest - 1` bytes.
            let mut end = text.len().saturating_sub(longest.saturating_sub(1));
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            end.max(self.emitted)
        };
        let out = text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{write_tokenizer, Arch};
    use rand::Rng;

    fn tokenizer() -> (tempfile::TempDir, Arc<Tokenizer>) {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path(), Arch::Qwen2, 1024).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        (dir, Arc::new(tok))
    }

    #[test]
    fn pieces_add_up_to_the_decoded_text() {
        let (_d, tok) = tokenizer();
        let mut rng = rand::thread_rng();
        for _ in 0..20 {
            let ids: Vec<u32> = (0..rng.gen_range(1..40))
                .map(|_| rng.gen_range(0..1000))
                .collect();
            let mut asm = TextAssembler::new(tok.clone(), Vec::new());
            let mut out = String::new();
            for &id in &ids {
                out += &asm.push(id).unwrap();
            }
            out += &asm.finish().unwrap();
            assert_eq!(out, tok.decode(&ids).unwrap(), "{ids:?}");
        }
    }

    #[test]
    fn a_stop_string_across_tokens_ends_the_text_before_it() {
        let (_d, tok) = tokenizer();
        let mut rng = rand::thread_rng();
        let words = ["alpha", "beta", "gamma", "delta", "omega"];
        let mut text = String::new();
        for _ in 0..rng.gen_range(3..12) {
            text += words[rng.gen_range(0..words.len())];
            text += " ";
        }
        let stop = "STOP here";
        let full = format!("{text}{stop} and more");
        let ids = tok.encode(&full, false).unwrap();
        let mut asm = TextAssembler::new(tok.clone(), vec![stop.to_string(), "zz!".into()]);
        let mut out = String::new();
        for &id in &ids {
            out += &asm.push(id).unwrap();
            if asm.stopped() {
                break;
            }
        }
        out += &asm.finish().unwrap();
        assert!(asm.stopped());
        assert_eq!(out, text);
    }
}
