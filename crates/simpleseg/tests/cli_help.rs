//! Every flag of every command says what it does: walks `simpleseg help` through all
//! subcommands and fails on an option printed without a description.

use std::process::Command;

fn help(path: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
        .arg("help")
        .args(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "simpleseg help {}", path.join(" "));
    String::from_utf8(out.stdout).unwrap()
}

/// The subcommands a help page lists under "Commands:" (but `help` itself).
fn subcommands(page: &str) -> Vec<String> {
    page.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Whether a help line starts an option: clap prints `  -s, --long` or `      --long` (deeper
/// lines are wrapped descriptions and possible values).
fn is_option(line: &str) -> bool {
    let short = line.strip_prefix("  -").is_some_and(|rest| {
        rest.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
            && rest[1..].starts_with(", --")
    });
    short
        || line
            .strip_prefix("      --")
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_alphanumeric()))
}

/// The options on a help page printed without a description. Clap prints a description on
/// the option's line after two spaces or more, or (long help) on the next line, indented
/// deeper.
fn undescribed(page: &str) -> Vec<String> {
    let lines: Vec<&str> = page.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !is_option(line) {
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        // The flag and its value names are separated by single spaces; a description follows
        // after at least two. Clap's own notes (`[default: 300]`, `Possible values:`) are no
        // description.
        let describes = |text: &str| {
            !text.is_empty()
                && !text.starts_with('[')
                && !text.starts_with('-')
                && text != "Possible values:"
        };
        let same_line = trimmed
            .trim_end()
            .split_once("  ")
            .is_some_and(|(_, rest)| describes(rest.trim()));
        let next_line = lines.get(i + 1).is_some_and(|next| {
            let t = next.trim();
            describes(t) && next.len() - next.trim_start().len() > indent
        });
        if !same_line && !next_line {
            missing.push(trimmed.trim_end().to_string());
        }
    }
    missing
}

#[test]
fn every_flag_of_every_command_has_help() {
    let mut queue: Vec<Vec<String>> = vec![Vec::new()];
    let mut pages = 0;
    let mut flags = 0;
    let mut missing = Vec::new();
    while let Some(path) = queue.pop() {
        let page = help(&path);
        pages += 1;
        flags += page.lines().filter(|l| is_option(l)).count();
        for flag in undescribed(&page) {
            missing.push(format!("simpleseg {} {flag}", path.join(" ")));
        }
        for sub in subcommands(&page) {
            let mut next = path.clone();
            next.push(sub);
            queue.push(next);
        }
    }
    // Every command and its subcommands (train sft/rl, data synth/sft/rl) were read.
    assert!(pages >= 17, "only {pages} help pages found");
    assert!(flags > 300, "only {flags} flags found");
    assert!(
        missing.is_empty(),
        "flags without help:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_check_sees_a_flag_without_help() {
    let page = "Options:\n      --rle-a <A.json>  \n      --steps <N>  [default: 300]\n      --rle-b <B.json>  Second mask\n  -h, --help            Print help\n";
    assert_eq!(
        undescribed(page),
        ["--rle-a <A.json>", "--steps <N>  [default: 300]"]
    );
    let long = "Options:\n      --model <DIR>\n          Model folder, or with\n          --backend openai a name\n\n      --device <DEVICE>\n          Where it runs\n\n          Possible values:\n          - cpu: The CPU\n          - cuda\n\n      --seed <S>\n\n      --lr <LR>\n          [default: 0.0001]\n\n  -h, --help\n          Print help\n";
    assert_eq!(undescribed(long), ["--seed <S>", "--lr <LR>"]);
}
