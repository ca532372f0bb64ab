//! Hostile input, as a user, a model or an upload could send it. Every case must end in a
//! clear error and exit status 1 (2 for an argument that makes no sense), never a panic, an
//! abort or an out-of-memory, and must leave no file behind. Commands run under an
//! address-space limit, so an allocation that is not checked first fails the test instead of
//! the machine. Inputs are crafted here; nothing large is committed.

mod common;

use std::collections::BTreeSet;
use std::io::Cursor;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{fresh_dir, root};

/// Address space for commands that load no model.
const SMALL: u64 = 1 << 30;
/// Address space for commands that load the embedded model.
const MODEL: u64 = 4 << 30;

/// Runs the binary in `dir` under an address-space limit of `limit` bytes.
fn run_limited(args: &[&str], dir: &Path, limit: u64, stdin: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_simpleseg"));
    command
        .args(args)
        .current_dir(dir)
        .env("SIMPLESEG_CACHE", dir.join("../cache"))
        .stdin(match stdin {
            Some(path) => Stdio::from(std::fs::File::open(path).unwrap()),
            None => Stdio::null(),
        });
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.output().unwrap()
}

fn files_in(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            out.insert(path.clone());
            if path.is_dir() {
                walk(&path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, &mut out);
    out
}

/// Runs a case that must fail with exit status `code` and a message containing `needle`,
/// writing nothing into `dir`.
fn refused(case: &str, dir: &Path, args: &[&str], limit: u64, code: i32, needle: &str) {
    refused_with_stdin(case, dir, args, limit, None, code, needle);
}

fn refused_with_stdin(
    case: &str,
    dir: &Path,
    args: &[&str],
    limit: u64,
    stdin: Option<&Path>,
    code: i32,
    needle: &str,
) {
    let before = files_in(dir);
    let out = run_limited(args, dir, limit, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{case}: expected exit status {code}, got {:?}; stderr:\n{stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{case}: {stderr}");
    assert!(
        stderr.contains(needle),
        "{case}: stderr lacks {needle:?}:\n{stderr}"
    );
    let after = files_in(dir);
    assert_eq!(
        after.difference(&before).collect::<Vec<_>>(),
        Vec::<&PathBuf>::new(),
        "{case}: left files behind"
    );
}

fn succeeded(case: &str, dir: &Path, args: &[&str], limit: u64) -> Output {
    let out = run_limited(args, dir, limit, None);
    assert!(
        out.status.success(),
        "{case}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn encode(image: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .unwrap();
    bytes
}

fn noise(width: u32, height: u32) -> image::RgbImage {
    image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 13 % 256) as u8,
            ((x ^ y) % 256) as u8,
        ])
    })
}

/// PNG's chunk checksum (CRC-32, polynomial 0xEDB88320).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Image files that must be refused: bombs claiming huge sizes from tiny files, truncated
/// files, and bytes that are no image.
fn hostile_images(dir: &Path) -> Vec<(&'static str, PathBuf, &'static str)> {
    let jpeg = encode(&noise(64, 48), image::ImageFormat::Jpeg);
    let png = encode(&noise(64, 48), image::ImageFormat::Png);
    let mut cases = Vec::new();
    let mut write = |name: &'static str, bytes: &[u8], needle: &'static str| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        cases.push((name, path, needle));
    };
    // The baseline frame header's height and width claim 65500x65500 (a 1 KB file).
    let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
    let mut bomb = jpeg.clone();
    bomb[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xDC, 0xFF, 0xDC]);
    write("bomb.jpg", &bomb, "--max-image-pixels");
    let mut bomb = png.clone();
    bomb[16..24].copy_from_slice(&[0, 0, 0xEA, 0x60, 0, 0, 0xEA, 0x60]);
    let crc = crc32(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    write("bomb.png", &bomb, "--max-image-pixels");
    // 100000x1: within the pixel limit, over the side limit.
    let mut wide = png.clone();
    wide[16..24].copy_from_slice(&[0, 1, 0x86, 0xA0, 0, 0, 0, 1]);
    let crc = crc32(&wide[12..29]);
    wide[29..33].copy_from_slice(&crc.to_be_bytes());
    write("wide.png", &wide, "--max-image-side");
    write("cut.jpg", &jpeg[..jpeg.len() * 2 / 3], "truncated");
    write("cut.png", &png[..png.len() / 2], "truncated");
    write("noise.png", b"\x89PNG\r\n\x1a\nnot really", "cannot");
    write("text.jpg", b"just some text", "expected PNG or JPEG");
    write("empty.png", b"", "expected PNG or JPEG");
    cases
}

#[test]
fn hostile_images_are_refused_by_every_command_alike() {
    let dir = fresh_dir("hostile", "images");
    let work = dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("a.txt"), "[[[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]]]").unwrap();
    for (name, path, needle) in hostile_images(&work) {
        let p = path.to_str().unwrap();
        refused(
            &format!("decode --image {name}"),
            &work,
            &[
                "decode",
                "--response-file",
                "a.txt",
                "--image",
                p,
                "--rle-out",
                "r.json",
            ],
            SMALL,
            1,
            needle,
        );
        refused(
            &format!("target --mask {name}"),
            &work,
            &["target", "--mask", p],
            SMALL,
            1,
            needle,
        );
        refused(
            &format!("segment --image {name}"),
            &work,
            &[
                "segment",
                "--image",
                p,
                "--query",
                "x",
                "--max-new-tokens",
                "4",
            ],
            MODEL,
            1,
            needle,
        );
        refused(
            &format!("chat --image {name}"),
            &work,
            &[
                "chat",
                "--image",
                p,
                "--prompt",
                "x",
                "--max-new-tokens",
                "4",
            ],
            MODEL,
            1,
            needle,
        );
    }
    // A limit raised by flag lets a big (real) image through.
    std::fs::write(
        work.join("ok.png"),
        encode(&noise(300, 200), image::ImageFormat::Png),
    )
    .unwrap();
    refused(
        "decode --image over a lowered limit",
        &work,
        &[
            "decode",
            "--response-file",
            "a.txt",
            "--image",
            "ok.png",
            "--max-image-pixels",
            "1000",
        ],
        SMALL,
        1,
        "--max-image-pixels",
    );
    succeeded(
        "decode --image within the limits",
        &work,
        &["decode", "--response-file", "a.txt", "--image", "ok.png"],
        SMALL,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn oversized_masks_and_endless_inputs_fail_before_allocating() {
    let dir = fresh_dir("hostile", "sizes");
    std::fs::write(dir.join("a.txt"), "[[[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]]]").unwrap();
    for (w, h) in [("4294967295", "1"), ("1", "4294967295"), ("60000", "60000")] {
        refused(
            &format!("decode {w}x{h} to PNG"),
            &dir,
            &[
                "decode",
                "--response-file",
                "a.txt",
                "--width",
                w,
                "--height",
                h,
                "--rle-out",
                "r.json",
                "--mask-out",
                "m.png",
            ],
            SMALL,
            1,
            "over the limit",
        );
    }
    // Run lengths need no dense mask: the widest RLE is fine.
    succeeded(
        "decode 4294967295x1 to RLE",
        &dir,
        &[
            "decode",
            "--response-file",
            "a.txt",
            "--width",
            "4294967295",
            "--height",
            "1",
            "--rle-out",
            "wide.json",
        ],
        SMALL,
    );
    refused(
        "decode 65536x65536 (more than 2^32 pixels)",
        &dir,
        &[
            "decode",
            "--response-file",
            "a.txt",
            "--width",
            "65536",
            "--height",
            "65536",
            "--rle-out",
            "r.json",
        ],
        SMALL,
        1,
        "2^32",
    );
    refused(
        "--response-file /dev/zero",
        &dir,
        &[
            "decode",
            "--response-file",
            "/dev/zero",
            "--width",
            "10",
            "--height",
            "10",
        ],
        SMALL,
        1,
        "--max-text-bytes",
    );
    refused_with_stdin(
        "--response-file - < /dev/zero",
        &dir,
        &[
            "decode",
            "--response-file",
            "-",
            "--width",
            "10",
            "--height",
            "10",
        ],
        SMALL,
        Some(Path::new("/dev/zero")),
        1,
        "--max-text-bytes",
    );
    refused(
        "--image /dev/zero",
        &dir,
        &["decode", "--response-file", "a.txt", "--image", "/dev/zero"],
        SMALL,
        1,
        "expected PNG or JPEG",
    );
    refused(
        "target --rle of a mask too large to draw",
        &dir,
        &["target", "--rle", "wide.json"],
        SMALL,
        1,
        "over the limit",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn very_long_answers_rasterize_in_bounded_memory() {
    let dir = fresh_dir("hostile", "long");
    // 300,000 points zigzagging over a 1000x800 image: some 10^8 column crossings, which a
    // list of crossings would hold in more than a gigabyte.
    let mut answer = String::from("[[");
    for i in 0..300_000u64 {
        let x = if i % 2 == 0 { 0.001 } else { 0.999 };
        let y = ((i * 7919) % 1000) as f64 / 1000.0;
        if i > 0 {
            answer.push_str(", ");
        }
        answer.push_str(&format!("[{x}, {y}]"));
    }
    answer.push_str("]]");
    std::fs::write(dir.join("long.txt"), &answer).unwrap();
    let out = succeeded(
        "a 300,000-point answer",
        &dir,
        &[
            "decode",
            "--response-file",
            "long.txt",
            "--width",
            "1000",
            "--height",
            "800",
            "--rle-out",
            "long.json",
        ],
        SMALL,
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 polygon"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 320,000 triangles (a 16 MB answer, within the text limit): the union grows by one bit per
/// pixel, not by polygons times the image's width.
#[test]
fn many_polygons_rasterize_in_bounded_memory() {
    let dir = fresh_dir("hostile", "triangles");
    let mut answer = String::with_capacity(17 << 20);
    answer.push('[');
    for i in 0..320_000u64 {
        let (x, y) = (
            (i * 7919 % 997) as f64 / 1000.0,
            (i * 104_729 % 991) as f64 / 1000.0,
        );
        if i > 0 {
            answer.push_str(", ");
        }
        answer.push_str(&format!(
            "[[{x:.3}, {y:.3}], [{:.3}, {y:.3}], [{x:.3}, {:.3}]]",
            x + 0.002,
            y + 0.003
        ));
    }
    answer.push(']');
    std::fs::write(dir.join("triangles.txt"), &answer).unwrap();
    for (width, height) in [("1000", "800"), ("4000", "3000")] {
        let out = succeeded(
            &format!("320,000 triangles at {width}x{height}"),
            &dir,
            &[
                "decode",
                "--response-file",
                "triangles.txt",
                "--width",
                width,
                "--height",
                height,
                "--rle-out",
                "t.json",
            ],
            SMALL,
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("320000 polygons"),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Ctrl-C (or SIGTERM) while `data synth` writes: no image and no temporary file remain, and
/// the dataset's index is as it was. After SIGKILL, the next run into the folder removes what
/// the killed one left.
#[test]
fn interrupted_outputs_leave_nothing_behind() {
    let dir = fresh_dir("hostile", "interrupt");
    let out = dir.join("data");
    let images = out.join("images/synth");
    let leftovers =
        || -> Vec<PathBuf> { files_in(&dir).into_iter().filter(|p| p.is_file()).collect() };
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGKILL] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
            .args([
                "data",
                "synth",
                "--out",
                out.to_str().unwrap(),
                "--count",
                "100000",
                "--split",
                "big",
                "--seed",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until images are being written.
        let start = std::time::Instant::now();
        while !images.is_dir() || std::fs::read_dir(&images).unwrap().count() < 20 {
            assert!(start.elapsed().as_secs() < 60, "no image written");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // SAFETY: sends a signal to our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        if signal == libc::SIGKILL {
            assert!(
                !leftovers().is_empty(),
                "a killed process leaves its temporaries"
            );
            // The next run writing into the folder removes them.
            let next = Command::new(env!("CARGO_BIN_EXE_simpleseg"))
                .args([
                    "data",
                    "synth",
                    "--out",
                    out.to_str().unwrap(),
                    "--count",
                    "2",
                    "--split",
                    "small",
                    "--seed",
                    "2",
                ])
                .output()
                .unwrap();
            assert!(
                next.status.success(),
                "{}",
                String::from_utf8_lossy(&next.stderr)
            );
            let names: Vec<String> = files_in(&images)
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");
            assert!(names.iter().all(|n| n.starts_with("small_")), "{names:?}");
        } else {
            assert_eq!(status.code(), Some(130), "{signal}: {status:?}");
            assert_eq!(leftovers(), Vec::<PathBuf>::new(), "signal {signal}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failing_output_leaves_no_other_output() {
    let dir = fresh_dir("hostile", "outputs");
    std::fs::write(dir.join("a.txt"), "[[[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]]]").unwrap();
    std::fs::write(
        dir.join("i.png"),
        encode(&noise(40, 30), image::ImageFormat::Png),
    )
    .unwrap();
    for (case, bad) in [
        ("overlay into a missing folder", "missing/o.png"),
        ("overlay with an unknown extension", "o.xyz"),
    ] {
        refused(
            case,
            &dir,
            &[
                "decode",
                "--response-file",
                "a.txt",
                "--image",
                "i.png",
                "--rle-out",
                "r.json",
                "--mask-out",
                "m.png",
                "--overlay-out",
                bad,
            ],
            SMALL,
            1,
            "o.",
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_model_settings_are_refused() {
    let dir = fresh_dir("hostile", "processor");
    succeeded("export-model", &dir, &["export-model", "--out", "m"], SMALL);
    let path = dir.join("m/preprocessor_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["min_pixels"] = serde_json::json!(100_000_000_000u64);
    config["max_pixels"] = serde_json::json!(200_000_000_000u64);
    std::fs::write(&path, config.to_string()).unwrap();
    std::fs::write(
        dir.join("i.png"),
        encode(&noise(40, 30), image::ImageFormat::Png),
    )
    .unwrap();
    refused(
        "min_pixels of 1e11",
        &dir,
        &[
            "segment",
            "--model",
            "m",
            "--image",
            "i.png",
            "--query",
            "x",
            "--rle-out",
            "r.json",
        ],
        MODEL,
        1,
        "min_pixels",
    );
    // A chat template that would loop 10^10 times.
    succeeded("export-model", &dir, &["export-model", "--out", "t"], SMALL);
    std::fs::write(
        dir.join("t/chat_template.jinja"),
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    )
    .unwrap();
    refused(
        "a chat template that never ends",
        &dir,
        &["chat", "--model", "t", "--image", "i.png", "--prompt", "x"],
        MODEL,
        1,
        "fuel",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A refer root holding one dataset `x` with these files.
fn refer_root(dir: &Path, refs: &[u8], instances: &str) -> PathBuf {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("x")).unwrap();
    std::fs::write(root.join("x/refs(unc).p"), refs).unwrap();
    std::fs::write(root.join("x/instances.json"), instances).unwrap();
    root
}

#[test]
fn hostile_datasets_are_refused() {
    let empty_instances = r#"{"images": [], "annotations": [], "categories": []}"#;
    // 10,000 nested lists.
    let mut deep = vec![0x80, 2];
    deep.extend(std::iter::repeat_n(b']', 10_000));
    deep.extend(std::iter::repeat_n(b'a', 9_999));
    deep.push(b'.');
    // Each list holds two references to the one before: 2^40 values from 400 bytes.
    let mut bomb = vec![0x80, 2, b']', b'q', 0];
    for i in 1..=40u8 {
        bomb.extend([b']', b'h', i - 1, b'a', b'h', i - 1, b'a', b'q', i]);
    }
    bomb.push(b'.');
    let empty_refs = [0x80, 2, b']', b'.'];
    let deep_json = "[".repeat(100_000);
    let box_instances = r#"{"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4],
                         "segmentation": [[1, 2, 3, 4]]}],
        "categories": [{"id": 1, "name": "box"}]}"#;
    let cases: [(&str, &[u8], &str, &str); 4] = [
        ("refs nested 10,000 deep", &deep, empty_instances, "deep"),
        (
            "refs expanding to 2^40 values",
            &bomb,
            empty_instances,
            "expands",
        ),
        (
            "instances nested 100,000 deep",
            &empty_refs,
            &deep_json,
            "recursion limit",
        ),
        (
            "a 4-number polygon",
            &empty_refs,
            box_instances,
            "4 numbers",
        ),
    ];
    for (case, refs, instances, needle) in cases {
        let dir = fresh_dir("hostile", "data");
        let root = refer_root(&dir, refs, instances);
        let root = root.to_str().unwrap();
        for command in ["sft", "rl"] {
            refused(
                &format!("data {command}: {case}"),
                &dir,
                &[
                    "data",
                    command,
                    "--refer-root",
                    root,
                    "--datasets",
                    "x",
                    "--out",
                    "out.jsonl",
                ],
                SMALL,
                1,
                needle,
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn arguments_that_make_no_sense_are_refused() {
    let dir = fresh_dir("hostile", "args");
    let refer = root().join("fixtures/refer");
    let refer = refer.to_str().unwrap();
    for (flag, value) in [
        ("--limit", "0"),
        ("--concurrency", "0"),
        ("--timeout-s", "0"),
    ] {
        refused(
            &format!("eval {flag} {value}"),
            &dir,
            &[
                "eval",
                "--refer-root",
                refer,
                "--dataset",
                "voc",
                flag,
                value,
            ],
            SMALL,
            2,
            flag,
        );
    }
    for (flag, value, code) in [
        ("--size", "0", 2),
        ("--size", "100000", 2),
        ("--count", "0", 2),
        ("--max-objects", "0", 2),
        ("--name", "../../escape", 1),
        ("--split", "../escape", 1),
    ] {
        let mut args = vec!["data", "synth", "--seed", "1", "--out", "out", flag, value];
        if flag != "--count" {
            args.extend(["--count", "2"]);
        }
        refused(
            &format!("data synth {flag} {value}"),
            &dir,
            &args,
            SMALL,
            code,
            flag,
        );
    }
    for (flag, value) in [
        ("--batch-size", "0"),
        ("--log-every", "0"),
        ("--save-every", "0"),
        ("--lr", "0"),
        ("--lr", "NaN"),
    ] {
        refused(
            &format!("train sft {flag} {value}"),
            &dir,
            &[
                "train", "sft", "--data", "d.jsonl", "--init", "m", "--out", "o", flag, value,
            ],
            SMALL,
            2,
            flag,
        );
    }
    refused(
        "eval --dataset escaping the root",
        &dir,
        &["eval", "--refer-root", refer, "--dataset", "../refer/voc"],
        SMALL,
        1,
        "plain name",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
