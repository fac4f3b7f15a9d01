//! Turning a request's tokens into text as they come: incremental decoding
//! that holds back an incomplete UTF-8 character, and `stop` strings, which
//! end the text before they start and may span tokens.

use std::sync::Arc;

use crate::llm::Tokenizer;
use crate::Result;

/// The text of one request's tokens so far, decoded incrementally: each
/// token decodes a short window of the latest tokens, not the whole
/// sequence, so a token costs the same at the end of a long completion as
/// at its start.
pub struct TextAssembler {
    tok: Arc<Tokenizer>,
    ids: Vec<u32>,
    stops: Vec<String>,
    /// The settled text of `ids[..read]`.
    text: String,
    /// Where the decoding window starts: the token before the newest
    /// settled ones, so that what a tokenizer does to the first token of
    /// a decoding (a leading space stripped) never reaches the new text.
    prefix: usize,
    /// Tokens whose text is in `text`.
    read: usize,
    /// Bytes of `text` already handed out.
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
            text: String::new(),
            prefix: 0,
            read: 0,
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
        // The window's text before and after the new tokens: what it gained
        // is settled once it ends in a whole character and extends, rather
        // than rewrites, what came before.
        let before = self.tok.decode(&self.ids[self.prefix..self.read])?;
        let now = self.tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && now.starts_with(&before) && !now.ends_with('\u{FFFD}') {
            self.text.push_str(&now[before.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(self.advance(false))
    }

    /// The text not handed out yet, once no token follows.
    pub fn finish(&mut self) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        if self.read < self.ids.len() {
            // Tokens left unsettled: decode the whole sequence once.
            let full = self.tok.decode(&self.ids)?;
            if full
                .as_bytes()
                .starts_with(&self.text.as_bytes()[..self.emitted])
            {
                self.text = full;
            }
            self.read = self.ids.len();
        }
        Ok(self.advance(true))
    }

    /// Hands out `text[emitted..end]`, where `end` is a stop string's start,
    /// or else as far as no stop string or incomplete character could
    /// still change it (all of it when `last`).
    fn advance(&mut self, last: bool) -> String {
        let text = self.text.as_str();
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

    fn tokenizer_of(arch: Arch) -> (tempfile::TempDir, Arc<Tokenizer>) {
        let dir = tempfile::tempdir().unwrap();
        write_tokenizer(dir.path(), arch, 1024).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        (dir, Arc::new(tok))
    }

    fn tokenizer() -> (tempfile::TempDir, Arc<Tokenizer>) {
        tokenizer_of(Arch::Qwen2)
    }

    #[test]
    fn pieces_add_up_to_the_decoded_text() {
        let mut rng = rand::thread_rng();
        let words = ["héllo", " wörld", " 中文", " 🙂", " plain", "\n", " x"];
        for arch in [Arch::Qwen2, Arch::Llama] {
            let (_d, tok) = tokenizer_of(arch);
            for round in 0..20 {
                // Random ids (bytes that may not form characters) or text
                // with characters of several bytes.
                let ids: Vec<u32> = if round % 2 == 0 {
                    (0..rng.gen_range(1..40))
                        .map(|_| rng.gen_range(0..1000))
                        .collect()
                } else {
                    let text: String = (0..rng.gen_range(1..12))
                        .map(|_| words[rng.gen_range(0..words.len())])
                        .collect();
                    tok.encode(&text, false).unwrap()
                };
                let mut asm = TextAssembler::new(tok.clone(), Vec::new());
                let mut out = String::new();
                for &id in &ids {
                    out += &asm.push(id).unwrap();
                    if round % 2 == 1 {
                        // Whole characters settle: the window stays short.
                        let window = asm.ids.len() - asm.prefix;
                        assert!(window <= 8, "{arch:?}: a window of {window} tokens");
                    }
                }
                out += &asm.finish().unwrap();
                assert_eq!(out, tok.decode(&ids).unwrap(), "{arch:?} {ids:?}");
            }
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

    #[test]
    fn a_stop_string_in_the_text_that_settles_at_the_end_stops() {
        // Byte-level BPE: "\u{e2}" is the token of the single byte 0xE2, the
        // start of a three-byte character that never completes, so the text
        // ends in U+FFFD and settles only in `finish`.
        let (_dir, tok) = tokenizer_of(Arch::Qwen2);
        let lead = tok.token_id("\u{e2}").expect("a byte-level vocabulary");
        let mut ids = tok.encode("ab w", false).unwrap();
        ids.push(lead);
        let stop = "w\u{FFFD}".to_string();
        assert!(tok.decode(&ids).unwrap().contains(&stop));
        let mut asm = TextAssembler::new(tok.clone(), vec![stop]);
        let mut out = String::new();
        for &id in &ids {
            out += &asm.push(id).unwrap();
        }
        assert!(
            !asm.stopped(),
            "the last character is not settled before the end"
        );
        out += &asm.finish().unwrap();
        assert!(asm.stopped());
        assert_eq!(out, "ab ");
    }
}
