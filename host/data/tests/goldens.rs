//! Token ids and assistant masks identical to transformers' (tests/data/make_goldens.py).

mod common;

use lora_api::{Message, Sample, TextTools};
use lora_data::tokenize_sample;

fn check_style(style: &str) {
    let tools = common::tools(style);
    let path = common::data_dir()
        .join("goldens")
        .join(format!("{style}.json"));
    let golden: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        tools.vocab_size() as u64,
        golden["vocab_size"].as_u64().unwrap(),
        "{style}: vocab size"
    );
    assert_eq!(
        tools.eos_token(),
        golden["eos_token"].as_str(),
        "{style}: eos token"
    );
    for (n, case) in golden["chat"].as_array().unwrap().iter().enumerate() {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let text = tools.apply_chat_template(&messages, false).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "{style} conversation {n}: rendered text"
        );
        let t = tokenize_sample(&tools, &Sample::Chat { messages }, false, "messages").unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let mask: Vec<bool> = serde_json::from_value(case["train_mask"].clone()).unwrap();
        assert_eq!(t.input_ids, ids, "{style} conversation {n}: ids");
        if t.train_mask != mask {
            let first = t
                .train_mask
                .iter()
                .zip(&mask)
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "{style} conversation {n}: mask differs first at token {first} (ours {}, HF {})",
                t.train_mask[first], mask[first]
            );
        }
        // The trained part ends with the end-of-turn token: the model learns to stop.
        let last_trained = t.train_mask.iter().rposition(|&m| m).unwrap();
        let eot = tools
            .decode(&t.input_ids[last_trained..=last_trained], false)
            .unwrap();
        assert!(
            ["<|im_end|>", "<|eot_id|>"].contains(&eot.as_str()),
            "{style} conversation {n}: last trained token is {eot:?}"
        );
    }
    for (n, case) in golden["prompt_completion"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let sample = Sample::PromptCompletion {
            prompt: case["prompt"].as_str().unwrap().into(),
            completion: case["completion"].as_str().unwrap().into(),
        };
        let t = tokenize_sample(&tools, &sample, false, "output").unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let mask: Vec<bool> = serde_json::from_value(case["train_mask"].clone()).unwrap();
        assert_eq!(t.input_ids, ids, "{style} prompt/completion {n}: ids");
        assert_eq!(t.train_mask, mask, "{style} prompt/completion {n}: mask");
        assert_eq!(
            t.input_ids.last().copied(),
            tools.eos_id(),
            "{style} prompt/completion {n}: ends with EOS"
        );
    }
}

#[test]
fn qwen2_5_matches_transformers() {
    check_style("qwen2.5");
}

#[test]
fn qwen3_matches_transformers() {
    check_style("qwen3");
}

#[test]
fn smollm2_matches_transformers() {
    check_style("smollm2");
}

#[test]
fn llama3_matches_transformers() {
    check_style("llama3");
}

#[test]
fn train_on_inputs_trains_every_token_but_the_first() {
    let tools = common::tools("qwen2.5");
    let messages = vec![
        Message {
            role: "user".into(),
            content: "hi".into(),
        },
        Message {
            role: "assistant".into(),
            content: "yo".into(),
        },
    ];
    let t = tokenize_sample(
        &tools,
        &Sample::Chat {
            messages: messages.clone(),
        },
        true,
        "messages",
    )
    .unwrap();
    assert!(!t.train_mask[0]);
    assert!(t.train_mask[1..].iter().all(|&m| m));
    let masked = tokenize_sample(&tools, &Sample::Chat { messages }, false, "messages").unwrap();
    assert_eq!(masked.input_ids, t.input_ids);
    assert!(masked.trained_tokens() < t.trained_tokens());
}

#[test]
fn the_fast_bpe_path_equals_the_tokenizers_pipeline() {
    for style in ["qwen2.5", "qwen3", "smollm2", "llama3"] {
        let tools = common::tools(style);
        assert!(
            tools.has_fast_path(),
            "{style}: byte-level BPE should take the fast path"
        );
        let golden: serde_json::Value = serde_json::from_slice(
            &std::fs::read(
                common::data_dir()
                    .join("goldens")
                    .join(format!("{style}.json")),
            )
            .unwrap(),
        )
        .unwrap();
        let mut texts: Vec<String> = golden["chat"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap().to_owned())
            .collect();
        texts.extend([
            "  leading spaces, tabs\t\tand\r\nCRLF\n\n\nnewlines   ".to_owned(),
            "Ünïcödé NFC: e\u{301} (decomposed) vs é; 数据 🙂 👩‍👩‍👧".to_owned(),
            "numbers 1234567 3.14159 and code: fn main() { let x = vec![1,2]; }".to_owned(),
            "<|im_start|>user\nhi<|im_end|><think>\n</think>".to_owned(),
            "x".repeat(5000),
        ]);
        for text in &texts {
            let fast = tools.encode_with_offsets(text, false).unwrap();
            let slow = tools.encode_with_offsets_slow(text, false).unwrap();
            assert_eq!(fast.0, slow.0, "{style}: ids of {text:?}");
            // Tokens inside one multi-byte character: tokenizers' own offsets there are not
            // byte-exact either; widened to whole characters (what a mask span can see) they agree.
            let snap = |o: &[(usize, usize)]| -> Vec<(usize, usize)> {
                o.iter()
                    .map(|&(mut s, mut e)| {
                        while !text.is_char_boundary(s) {
                            s -= 1;
                        }
                        while !text.is_char_boundary(e) {
                            e += 1;
                        }
                        (s, e)
                    })
                    .collect()
            };
            assert_eq!(snap(&fast.1), snap(&slow.1), "{style}: offsets of {text:?}");
        }
    }
}
