//! Training data in the formats trainers read directly.
//!
//! SFT ([`SftFormat`]), one record per question and answer:
//! - `simpleseg`: the released data script's `{"conversations": [{"from": "user", "value":
//!   "<img>PATH</img>QUESTION"}, {"from": "assistant", "value": "ANSWER"}]}`;
//! - `llamafactory`: LLaMA-Factory's multimodal ShareGPT form, `{"messages": [{"role": "user",
//!   "content": "<image>QUESTION"}, {"role": "assistant", "content": "ANSWER"}], "images":
//!   [PATH]}`;
//! - `trl`: TRL's conversational vision form, `{"messages": [{"role": "user", "content":
//!   [{"type": "image"}, {"type": "text", "text": QUESTION}]}, {"role": "assistant",
//!   "content": [{"type": "text", "text": ANSWER}]}], "images": [PATH]}`.
//!
//! RL for verl ([`write_verl_parquet`]): a parquet file of verl's RLHF dataset rows, as its
//! vision examples (geo3k) write them: `data_source`, `prompt` (chat messages, the image as
//! `<image>`), `images` (a list of `{bytes, path}`: the image file's bytes, read by
//! `verl.utils.dataset.vision_utils.process_image`), `ability`, `reward_model` (`{style:
//! "rule", ground_truth}`: the mask's COCO RLE as a JSON string, what
//! `simpleseg.verl.compute_score` reads) and `extra_info` (`split`, `index`, `ref_id`,
//! `sent_id`, `width`, `height`).

use std::path::Path;
use std::sync::Arc;

use arrow_array::{
    ArrayRef, BinaryArray, Int64Array, ListArray, RecordBatch, StringArray, StructArray,
};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{DataType, Field, Fields, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rayon::prelude::*;
use serde_json::{json, Value};
use simpleseg_core::images::read_image_file;
use simpleseg_core::templates::fill_prompt;

use crate::error::{Error, Result};
use crate::items::Item;

/// The SFT record formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SftFormat {
    /// The released data script's `conversations` records.
    #[default]
    Simpleseg,
    /// LLaMA-Factory's `messages` + `images`, the image as `<image>` in the text.
    LlamaFactory,
    /// TRL's `messages` with typed content parts + `images`.
    Trl,
}

impl std::str::FromStr for SftFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "simpleseg" => Ok(SftFormat::Simpleseg),
            "llamafactory" => Ok(SftFormat::LlamaFactory),
            "trl" => Ok(SftFormat::Trl),
            other => Err(format!(
                "unknown format '{other}' (expected simpleseg, llamafactory or trl)"
            )),
        }
    }
}

impl SftFormat {
    /// One record: a question about `image` and its answer.
    pub fn record(self, image: &str, question: &str, answer: &str) -> Value {
        match self {
            SftFormat::Simpleseg => json!({
                "conversations": [
                    {"from": "user", "value": format!("<img>{image}</img>{question}")},
                    {"from": "assistant", "value": answer},
                ]
            }),
            SftFormat::LlamaFactory => json!({
                "messages": [
                    {"role": "user", "content": format!("<image>{question}")},
                    {"role": "assistant", "content": answer},
                ],
                "images": [image],
            }),
            SftFormat::Trl => json!({
                "messages": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ],
                "images": [image],
            }),
        }
    }
}

/// Rows per parquet row group: images are embedded, so this bounds the memory a write holds.
const ROWS_PER_GROUP: usize = 256;

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

fn int64(name: &str) -> Field {
    Field::new(name, DataType::Int64, true)
}

fn message_fields() -> Fields {
    Fields::from(vec![utf8("content"), utf8("role")])
}

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        utf8("path"),
    ])
}

fn reward_fields() -> Fields {
    Fields::from(vec![utf8("ground_truth"), utf8("style")])
}

fn extra_fields() -> Fields {
    Fields::from(vec![
        int64("height"),
        int64("index"),
        int64("ref_id"),
        int64("sent_id"),
        utf8("split"),
        int64("width"),
    ])
}

fn schema() -> Arc<Schema> {
    let list_of = |fields: Fields| {
        DataType::List(Arc::new(Field::new("item", DataType::Struct(fields), true)))
    };
    Arc::new(Schema::new(vec![
        utf8("data_source"),
        Field::new("prompt", list_of(message_fields()), true),
        Field::new("images", list_of(image_fields()), true),
        utf8("ability"),
        Field::new("reward_model", DataType::Struct(reward_fields()), true),
        Field::new("extra_info", DataType::Struct(extra_fields()), true),
    ]))
}

/// One verl row before it is columnar.
struct Row {
    prompt: String,
    image: Vec<u8>,
    image_path: String,
    ground_truth: String,
    index: i64,
    ref_id: i64,
    sent_id: i64,
    width: i64,
    height: i64,
}

/// A list column of one struct per row.
fn one_per_row(fields: Fields, columns: Vec<ArrayRef>) -> Result<ListArray> {
    let rows = columns.first().map_or(0, |c| c.len());
    let values = StructArray::try_new(fields.clone(), columns, None).map_err(arrow_error)?;
    ListArray::try_new(
        Arc::new(Field::new("item", DataType::Struct(fields), true)),
        OffsetBuffer::from_lengths(std::iter::repeat_n(1, rows)),
        Arc::new(values),
        None,
    )
    .map_err(arrow_error)
}

fn arrow_error(e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("writing parquet: {e}"))
}

fn batch(rows: &[Row], data_source: &str, split: &str) -> Result<RecordBatch> {
    let n = rows.len();
    let strings = |f: &dyn Fn(&Row) -> String| -> ArrayRef {
        Arc::new(StringArray::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let ints = |f: &dyn Fn(&Row) -> i64| -> ArrayRef {
        Arc::new(Int64Array::from(rows.iter().map(f).collect::<Vec<_>>()))
    };
    let repeat = |text: &str| -> ArrayRef { Arc::new(StringArray::from(vec![text; n])) };
    let prompt = one_per_row(
        message_fields(),
        vec![strings(&|r| format!("<image>{}", r.prompt)), repeat("user")],
    )?;
    let images = one_per_row(
        image_fields(),
        vec![
            Arc::new(BinaryArray::from(
                rows.iter().map(|r| r.image.as_slice()).collect::<Vec<_>>(),
            )),
            strings(&|r| r.image_path.clone()),
        ],
    )?;
    let reward = StructArray::try_new(
        reward_fields(),
        vec![strings(&|r| r.ground_truth.clone()), repeat("rule")],
        None,
    )
    .map_err(arrow_error)?;
    let extra = StructArray::try_new(
        extra_fields(),
        vec![
            ints(&|r| r.height),
            ints(&|r| r.index),
            ints(&|r| r.ref_id),
            ints(&|r| r.sent_id),
            repeat(split),
            ints(&|r| r.width),
        ],
        None,
    )
    .map_err(arrow_error)?;
    RecordBatch::try_new(
        schema(),
        vec![
            repeat(data_source),
            Arc::new(prompt),
            Arc::new(images),
            repeat("segmentation"),
            Arc::new(reward),
            Arc::new(extra),
        ],
    )
    .map_err(arrow_error)
}

/// Writes verl RL rows for every expression of `items` (in order, as `rl_records` does) to
/// `path`, atomically: `data_source` names the data, `split` goes into `extra_info`. Returns
/// the number of rows.
pub fn write_verl_parquet(
    path: &Path,
    items: &[&Item],
    prompt_template: &str,
    data_source: &str,
    split: &str,
) -> Result<usize> {
    let mut rows_written = 0usize;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    simpleseg_core::io::write_atomic(path, |w| -> std::result::Result<(), String> {
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut writer =
            ArrowWriter::try_new(w, schema(), Some(properties)).map_err(|e| e.to_string())?;
        // Items a group at a time: their masks and images read in parallel, written in order.
        let mut index = 0i64;
        for group in items.chunks(ROWS_PER_GROUP) {
            let prepared: Vec<Result<(String, Vec<u8>)>> = group
                .par_iter()
                .map(|item| {
                    let rle = item.mask()?.to_json_value().to_string();
                    Ok((rle, read_image_file(&item.image)?))
                })
                .collect();
            let mut rows = Vec::new();
            for (item, prepared) in group.iter().zip(prepared) {
                let (rle, image) = prepared.map_err(|e| e.to_string())?;
                for s in &item.sentences {
                    rows.push(Row {
                        prompt: fill_prompt(prompt_template, &s.sent),
                        image: image.clone(),
                        image_path: item.image_rel.clone(),
                        ground_truth: rle.clone(),
                        index,
                        ref_id: item.ref_id as i64,
                        sent_id: s.sent_id as i64,
                        width: i64::from(item.width),
                        height: i64::from(item.height),
                    });
                    index += 1;
                }
            }
            rows_written += rows.len();
            let batch = batch(&rows, data_source, split).map_err(|e| e.to_string())?;
            writer.write(&batch).map_err(|e| e.to_string())?;
        }
        writer.close().map_err(|e| e.to_string())?;
        Ok(())
    })
    .map_err(|e| match e {
        simpleseg_core::Error::Io { source, .. } => io(source),
        other => Error::from(other),
    })?;
    Ok(rows_written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sft_records_in_each_format() {
        let q = "Output the polygon coordinates of the cat in the image.";
        let a = "[[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]].";
        let simpleseg = SftFormat::Simpleseg.record("images/a.jpg", q, a);
        assert_eq!(
            simpleseg["conversations"][0]["value"],
            format!("<img>images/a.jpg</img>{q}")
        );
        let factory = SftFormat::LlamaFactory.record("images/a.jpg", q, a);
        assert_eq!(factory["messages"][0]["content"], format!("<image>{q}"));
        assert_eq!(factory["messages"][1]["content"], a);
        assert_eq!(factory["images"], json!(["images/a.jpg"]));
        let trl = SftFormat::Trl.record("images/a.jpg", q, a);
        assert_eq!(trl["messages"][0]["content"][0], json!({"type": "image"}));
        assert_eq!(trl["messages"][0]["content"][1]["text"], q);
        assert_eq!(trl["messages"][1]["content"][0]["text"], a);
        assert!("sharegpt".parse::<SftFormat>().is_err());
    }
}
