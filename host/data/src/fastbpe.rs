//! A fast path for byte-level BPE tokenizers (Qwen, Llama 3, GPT-2 and SmolLM2 style), used for
//! `encode(text, add_special_tokens=false)` with offsets: the chat path's hot loop.
//!
//! It does what `tokenizers` does for these pipelines (split out added tokens; the normalizer
//! must leave the text unchanged; the pre-tokenizer regex; byte-level mapping; the BPE model)
//! but caches the BPE result of every distinct piece, so repeated words cost one hash lookup,
//! and skips `NormalizedString`'s per-character alignment bookkeeping. The BPE itself is the
//! `tokenizers` model's own. Only recognised pipelines take this path; everything else, and any
//! text the normalizer would change, goes through `Tokenizer::encode`. A test checks equality
//! with `Tokenizer::encode` on every golden text: the same ids; the same offsets, except that
//! tokens inside one multi-byte character get exact byte ranges here (tokenizers widens them
//! oddly); widened to whole characters, which is all a mask span can see, they agree.

use std::collections::HashMap;
use std::sync::RwLock;

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::{Model, NormalizedString, Normalizer, Tokenizer};

/// GPT-2's pre-tokenizer regex (ByteLevel with `use_regex: true`).
const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// One piece's tokens: (id, byte length) each.
type PieceTokens = Box<[(u32, u32)]>;

pub(crate) struct FastBpe {
    split: onig::Regex,
    added: AhoCorasick,
    added_ids: Vec<u32>,
    has_normalizer: bool,
    byte_char: [char; 256],
    /// piece → (id, byte length) per token.
    cache: RwLock<HashMap<Box<str>, PieceTokens>>,
}

/// GPT-2's bytes→unicode table.
fn byte_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\0');
            n += 1;
            c
        };
    }
    table
}

impl FastBpe {
    /// Recognises the pipeline from `tokenizer.json`; `None` when it is not one this path covers.
    pub(crate) fn new(tokenizer_json: &serde_json::Value, tokenizer: &Tokenizer) -> Option<Self> {
        let t = tokenizer_json;
        let model = t.get("model")?;
        if model.get("type")?.as_str()? != "BPE"
            || !model.get("dropout").is_none_or(|d| d.is_null())
        {
            return None;
        }
        let has_normalizer = match t.get("normalizer") {
            None | Some(serde_json::Value::Null) => false,
            Some(n) => match n.get("type")?.as_str()? {
                "NFC" => true,
                "Sequence" if n.get("normalizers")?.as_array()?.is_empty() => false,
                _ => return None,
            },
        };
        let pre = t.get("pre_tokenizer")?;
        let byte_level_ok = |b: &serde_json::Value| {
            b.get("type").and_then(|x| x.as_str()) == Some("ByteLevel")
                && b.get("add_prefix_space").and_then(|x| x.as_bool()) == Some(false)
        };
        let pattern = match pre.get("type")?.as_str()? {
            "ByteLevel" if byte_level_ok(pre) && pre.get("use_regex")?.as_bool()? => {
                GPT2_REGEX.to_owned()
            }
            "Sequence" => {
                let list = pre.get("pretokenizers")?.as_array()?;
                if list.len() != 2
                    || !byte_level_ok(&list[1])
                    || list[1].get("use_regex")?.as_bool()?
                {
                    return None;
                }
                let split = &list[0];
                if split.get("type")?.as_str()? != "Split"
                    || split.get("behavior")?.as_str()? != "Isolated"
                    || split.get("invert")?.as_bool()?
                {
                    return None;
                }
                split.get("pattern")?.get("Regex")?.as_str()?.to_owned()
            }
            _ => return None,
        };
        let split = onig::Regex::new(&pattern).ok()?;
        // Added tokens: only the plain kind (no normalisation, no stripping, not word-bound).
        let mut contents = Vec::new();
        let mut added_ids = Vec::new();
        for a in t.get("added_tokens")?.as_array()? {
            let plain = ["normalized", "lstrip", "rstrip", "single_word"]
                .iter()
                .all(|k| a.get(k).and_then(|v| v.as_bool()) == Some(false));
            if !plain {
                return None;
            }
            contents.push(a.get("content")?.as_str()?.to_owned());
            added_ids.push(a.get("id")?.as_u64()? as u32);
        }
        // Tokens added from tokenizer_config.json after loading are not in the JSON: add them.
        for (id, tok) in tokenizer.get_added_tokens_decoder() {
            if !contents.contains(&tok.content) {
                if tok.normalized || tok.lstrip || tok.rstrip || tok.single_word {
                    return None;
                }
                contents.push(tok.content.clone());
                added_ids.push(id);
            }
        }
        let added = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&contents)
            .ok()?;
        Some(FastBpe {
            split,
            added,
            added_ids,
            has_normalizer,
            byte_char: byte_chars(),
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// Ids and byte offsets of `text` without special tokens added; `None` when this text needs
    /// the full pipeline (the normalizer would change it).
    pub(crate) fn encode(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
    ) -> Option<super::tools::IdsAndOffsets> {
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut offsets = Vec::with_capacity(text.len() / 3);
        let mut at = 0;
        for m in self.added.find_iter(text) {
            self.encode_segment(tokenizer, text, at, m.start(), &mut ids, &mut offsets)?;
            ids.push(self.added_ids[m.pattern().as_usize()]);
            offsets.push((m.start(), m.end()));
            at = m.end();
        }
        self.encode_segment(tokenizer, text, at, text.len(), &mut ids, &mut offsets)?;
        Some((ids, offsets))
    }

    fn encode_segment(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        start: usize,
        end: usize,
        ids: &mut Vec<u32>,
        offsets: &mut Vec<(usize, usize)>,
    ) -> Option<()> {
        if start == end {
            return Some(());
        }
        let seg = &text[start..end];
        if self.has_normalizer && !seg.is_ascii() {
            let mut n = NormalizedString::from(seg);
            tokenizer.get_normalizer()?.normalize(&mut n).ok()?;
            if n.get() != seg {
                return None;
            }
        }
        // `Isolated`: matches are pieces, and so is any text between them.
        let mut pieces = Vec::new();
        let mut last = 0;
        for (ps, pe) in self.split.find_iter(seg) {
            if ps > last {
                pieces.push((last, ps));
            }
            if pe > ps {
                pieces.push((ps, pe));
            }
            last = pe;
        }
        if last < seg.len() {
            pieces.push((last, seg.len()));
        }
        for (ps, pe) in pieces {
            let piece = &seg[ps..pe];
            let base = start + ps;
            let cached = self.cache.read().ok()?.get(piece).cloned();
            let toks = match cached {
                Some(t) => t,
                None => {
                    let mapped: String =
                        piece.bytes().map(|b| self.byte_char[b as usize]).collect();
                    let toks: Box<[(u32, u32)]> = tokenizer
                        .get_model()
                        .tokenize(&mapped)
                        .ok()?
                        .into_iter()
                        .map(|t| (t.id, t.value.chars().count() as u32))
                        .collect();
                    if toks.iter().map(|t| t.1 as usize).sum::<usize>() != piece.len() {
                        return None;
                    }
                    if let Ok(mut c) = self.cache.write()
                        && c.len() < 1 << 20
                    {
                        c.insert(piece.into(), toks.clone());
                    }
                    toks
                }
            };
            let mut o = base;
            for &(id, len) in toks.iter() {
                ids.push(id);
                offsets.push((o, o + len as usize));
                o += len as usize;
            }
        }
        Some(())
    }
}
