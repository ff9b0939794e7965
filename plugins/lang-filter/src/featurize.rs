//! fastText 0.9.2's featurization of a line for a supervised model (`Dictionary::getLine`,
//! `computeSubwords`, `pushHash`), from the `vocab.json` tests/nn/make_langid.py writes. Plain Rust
//! with serde only: the plugin uses it, and so does the native side of the benchmark
//! (host/plugins/tests/lang_filter.rs), so both featurize with the same code.

use std::collections::HashMap;

use serde::Deserialize;

const EOS: &str = "</s>";

/// `vocab.json` from tests/nn/make_langid.py.
#[derive(Deserialize)]
pub struct Vocab {
    pub labels: Vec<String>,
    pub words: Vec<String>,
    pub minn: usize,
    pub maxn: usize,
    pub bucket: u32,
    pub prune_size: i64,
    pub prune: Vec<(u32, u32)>,
}

/// fastText's input ids of a line: words and character n-grams.
pub struct Featurizer {
    words: HashMap<String, i64>,
    nwords: i64,
    minn: usize,
    maxn: usize,
    bucket: u32,
    /// Pruned models keep only some n-gram buckets: bucket → row after the words.
    prune: Option<HashMap<u32, u32>>,
}

/// fastText's `Dictionary::hash`: FNV-1a over the bytes, each sign-extended (`int8_t`) first.
fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 2_166_136_261;
    for &b in bytes {
        h ^= b as i8 as i32 as u32;
        h = h.wrapping_mul(16_777_619);
    }
    h
}

/// fastText's `readWord` separators.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\n' | '\r' | '\t' | '\u{0b}' | '\u{0c}' | '\0')
}

impl Featurizer {
    pub fn new(v: &Vocab) -> Featurizer {
        Featurizer {
            words: v.words.iter().enumerate().map(|(i, w)| (w.clone(), i as i64)).collect(),
            nwords: v.words.len() as i64,
            minn: v.minn,
            maxn: v.maxn,
            bucket: v.bucket,
            prune: (v.prune_size > 0).then(|| v.prune.iter().copied().collect()),
        }
    }

    /// `Dictionary::pushHash`.
    fn push_bucket(&self, ids: &mut Vec<i64>, h: u32) {
        match &self.prune {
            Some(map) => {
                if let Some(&row) = map.get(&h) {
                    ids.push(self.nwords + row as i64);
                }
            }
            None => ids.push(self.nwords + h as i64),
        }
    }

    /// `Dictionary::computeSubwords` of `<word>`: every 2..=maxn-character n-gram (UTF-8
    /// characters, not bytes), but not the lone `<` or `>`.
    fn subwords(&self, word: &str, ids: &mut Vec<i64>) {
        let w = format!("<{word}>");
        let b = w.as_bytes();
        for i in 0..b.len() {
            if b[i] & 0xC0 == 0x80 {
                continue;
            }
            let (mut j, mut n) = (i, 1);
            while j < b.len() && n <= self.maxn {
                j += 1;
                while j < b.len() && b[j] & 0xC0 == 0x80 {
                    j += 1;
                }
                if n >= self.minn && !(n == 1 && (i == 0 || j == b.len())) {
                    self.push_bucket(ids, fnv1a(&b[i..j]) % self.bucket);
                }
                n += 1;
            }
        }
    }

    /// The ids of one line as fastText's `getLine` gives them for a supervised model: a known
    /// word is its id and its n-grams, an unknown one its n-grams, then the end-of-line token.
    pub fn line(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        for tok in text.split(is_space).filter(|t| !t.is_empty()) {
            if let Some(&id) = self.words.get(tok) {
                ids.push(id);
            }
            if self.maxn > 0 && tok != EOS {
                self.subwords(tok, &mut ids);
            }
        }
        if let Some(&eos) = self.words.get(EOS) {
            ids.push(eos);
        }
        ids
    }
}

