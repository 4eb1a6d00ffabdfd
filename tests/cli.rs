//! The `nocturne` command end to end: the README's main job answers a real
//! prompt with both packs, and bad input gives a clear error and a non-zero
//! exit, never a panic. Needs the converted model: run `models/fetch` first.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn nocturne(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nocturne"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        pipe.write_all(bytes).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn failure(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success(), "expected failure, got success: {stderr}");
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn capital_of_france_is_paris_with_both_packs() {
    for precision in ["int8", "fp16"] {
        let out = nocturne(&["generate", "--json", "--precision", precision, "What is the capital of France?"], None);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(reply["reply"].as_str().unwrap().contains("Paris"), "{precision}: {reply}");
        assert_eq!(reply["stop_reason"], "eos", "{precision}: {reply}");
        assert_eq!(reply["precision"], precision);
        assert!(reply["new_tokens"].as_u64().unwrap() > 0 && reply["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn prompt_on_stdin_streams_the_reply() {
    let out = nocturne(&["generate", "--max-new-tokens", "200"], Some(b"What is the capital of France?\n"));
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[eos;"));
}

#[test]
fn empty_prompt_is_an_error() {
    assert!(failure(&nocturne(&["generate", "  "], None)).contains("the prompt is empty"));
    assert!(failure(&nocturne(&["generate"], Some(b""))).contains("the prompt is empty"));
}

#[test]
fn invalid_utf8_on_stdin_is_an_error() {
    let stderr = failure(&nocturne(&["generate"], Some(b"caf\xe9 au lait")));
    assert!(stderr.contains("not valid UTF-8") && stderr.contains("offset 3"), "{stderr}");
}

#[test]
fn prompt_longer_than_the_context_is_an_error() {
    let long = "lighthouse ".repeat(2500);
    let stderr = failure(&nocturne(&["generate", "--raw", &long], None));
    assert!(stderr.contains("the context holds 2048"), "{stderr}");
}

#[test]
fn missing_model_directory_is_an_error() {
    let stderr = failure(&nocturne(&["generate", "--model", "/nonexistent/pack", "Hi"], None));
    assert!(stderr.contains("/nonexistent/pack") && stderr.contains("does not exist"), "{stderr}");
}

#[test]
fn info_prints_profile_and_plan() {
    let out = nocturne(&["info", "--plan"], None);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for part in ["profile            mid", "KV cache", "47185920", "mapped weights", "143078568"] {
        assert!(text.contains(part), "{text}");
    }
}
