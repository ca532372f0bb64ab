//! The `polygon` and `box` constraints accept every answer the SFT builder writes (the released
//! data script's answer forms around the list), token by token with both tokenizer kinds
//! (Qwen's byte-level BPE and Kimi's tiktoken), and allow stopping only at the end.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::{assert_success, fresh_dir, root};
use serde_json::Value;
use simpleseg_engine::runtime::constraint::{Grammar, TokenBytes};
use simpleseg_engine::{HfFolder, TextTokenizer};

/// The answers of an SFT file, with the preset each task's answers are held to.
fn sft_answers() -> Vec<(String, &'static str)> {
    let dir = fresh_dir("presets", "sft");
    let bin = env!("CARGO_BIN_EXE_simpleseg");
    let run = |args: &[&str]| {
        let out = Command::new(bin)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert_success(&out);
    };
    run(&[
        "data", "synth", "--seed", "11", "--count", "12", "--out", "root",
    ]);
    let mut answers = Vec::new();
    for (tasks, preset) in [
        ("text-mask,point-mask,box-mask", "polygon"),
        ("text-box", "box"),
    ] {
        let file = format!("{preset}.jsonl");
        run(&[
            "data",
            "sft",
            "--refer-root",
            "root",
            "--datasets",
            "synth",
            "--out",
            &file,
            "--tasks",
            tasks,
            "--seed",
            "3",
        ]);
        let text = std::fs::read_to_string(dir.join(&file)).unwrap();
        for line in text.lines() {
            let record: Value = serde_json::from_str(line).unwrap();
            let answer = record["conversations"][1]["value"].as_str().unwrap();
            answers.push((answer.to_string(), preset));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    answers
}

/// Walks `answer`'s tokens through the grammar: each must be allowed where it comes, and the
/// stop token only where the text so far is a whole answer: at the end, or after the bare list
/// of a `{a}.` answer.
fn decodes_under(grammar: &Grammar, tokenizer: &TextTokenizer, stop: u32, answer: &str) {
    let mut state = grammar.start().unwrap();
    let tokens = tokenizer.encode(answer).unwrap();
    for (i, &token) in tokens.iter().enumerate() {
        let so_far = tokenizer.decode(&tokens[..i]).unwrap();
        let whole = answer.starts_with('[') && so_far == answer.trim_end_matches('.');
        let allowed = grammar.allowed(state);
        assert_eq!(allowed[stop as usize], whole, "stopping after {so_far:?}");
        assert!(
            allowed[token as usize],
            "token {token} refused in {answer:?}"
        );
        state = grammar.advance(state, token).unwrap();
    }
    assert!(
        grammar.allowed(state)[stop as usize],
        "{answer:?} cannot end"
    );
}

#[test]
fn every_sft_answer_is_accepted_by_its_preset() {
    let answers = sft_answers();
    // The four forms of the data script all occur, so each is checked.
    for prefix in [
        "Sure, you can find it at [",
        "It is found at [",
        "It is at [",
        "[",
    ] {
        assert!(
            answers.iter().any(|(a, _)| a.starts_with(prefix)),
            "no answer begins {prefix:?}"
        );
    }
    assert!(answers.iter().any(|(_, p)| *p == "box"));
    let qwen = HfFolder::open(root().join("models/simpleseg-tiny")).unwrap();
    let kimi = HfFolder::open(root().join("fixtures/kimi/kimi-tiny")).unwrap();
    let tokenizers = [
        TextTokenizer::from_file(&qwen.path("tokenizer.json")).unwrap(),
        TextTokenizer::tiktoken(
            simpleseg_engine::text::tiktoken::TiktokenTokenizer::load(&kimi).unwrap(),
        ),
    ];
    for tokenizer in &tokenizers {
        let stop = tokenizer.token_id("<|im_end|>").unwrap();
        let tokens = Arc::new(TokenBytes::new(tokenizer, &[stop]).unwrap());
        let polygon = Grammar::polygon(tokens.clone()).unwrap();
        let bbox = Grammar::bbox(tokens).unwrap();
        for (answer, preset) in &answers {
            let grammar = if *preset == "box" { &bbox } else { &polygon };
            assert!(grammar.matches(answer), "{preset} refuses {answer:?}");
            decodes_under(grammar, tokenizer, stop, answer);
        }
    }
}
