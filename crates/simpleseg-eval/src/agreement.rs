//! How closely two models' answers agree on the same referring expressions: the check that a
//! quantized model still segments what its full-precision original segments.
//!
//! Both models answer every expression greedily with the same prompt. Per sample: the IoU
//! between the two answers' masks (1 when both are empty), each answer's IoU against the
//! ground truth, and how many generated tokens the two share (the common prefix over the
//! longer answer).

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use simpleseg_core::segment::Target;
use simpleseg_core::{CoordMode, ParseMode, RleMask};
use simpleseg_data::Item;
use simpleseg_engine::runtime::segment::{segment, SegmentOptions};
use simpleseg_engine::VisionLanguageModel;

use crate::error::{Error, Result};
use crate::metrics::{score_answer, BoxSource};
use crate::runner::Sample;

/// One expression answered by both models.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgreementSample {
    pub ref_id: u64,
    pub sent_id: u64,
    /// IoU between the two answers' masks.
    pub mask_iou: f64,
    /// Each answer's IoU against the ground truth.
    pub iou_reference: f64,
    pub iou_candidate: f64,
    /// Common prefix of the generated tokens over the longer answer's length.
    pub token_agreement: f64,
    pub answer_reference: String,
    pub answer_candidate: String,
}

/// The comparison over a set of expressions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    pub n: usize,
    /// Mean IoU between the two models' masks.
    pub mean_mask_iou: f64,
    /// Share of samples whose masks agree with IoU >= 0.9.
    pub share_at_least_0_9: f64,
    /// gIoU of each model against the ground truth.
    pub giou_reference: f64,
    pub giou_candidate: f64,
    /// Mean token agreement, and the share of identical answers.
    pub token_agreement: f64,
    pub identical_answers: f64,
    pub samples: Vec<AgreementSample>,
}

fn mask_iou(a: &RleMask, b: &RleMask) -> Result<f64> {
    let (i, u) = a.intersection_union(b)?;
    Ok(if u == 0 { 1.0 } else { i as f64 / u as f64 })
}

fn common_prefix_share(a: &[u32], b: &[u32]) -> f64 {
    let longer = a.len().max(b.len());
    if longer == 0 {
        return 1.0;
    }
    let common = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    common as f64 / longer as f64
}

/// The expressions both models answer, and how answers become masks.
#[derive(Clone, Copy, Debug)]
pub struct Expressions<'a> {
    pub items: &'a [Item],
    pub samples: &'a [Sample],
    /// Filled with each expression (`{query}`).
    pub prompt_template: &'a str,
    pub mode: ParseMode,
    pub coords: CoordMode,
}

/// Answers every expression with both models (greedy) and compares them. `progress` shows a
/// bar on standard error.
pub fn compare(
    reference: &dyn VisionLanguageModel,
    candidate: &dyn VisionLanguageModel,
    expressions: Expressions,
    progress: bool,
) -> Result<Agreement> {
    let Expressions {
        items,
        samples,
        prompt_template,
        mode,
        coords,
    } = expressions;
    let bar = if progress {
        let bar = ProgressBar::new(samples.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("comparing [{bar:40}] {pos}/{len} (eta {eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut out = Vec::with_capacity(samples.len());
    for sample in samples {
        let item = items
            .get(sample.item)
            .ok_or_else(|| Error::Invalid(format!("sample {} has no item", sample.sent_id)))?;
        let image = simpleseg_core::images::open_image(&item.image)?;
        let options = SegmentOptions {
            prompt_template: Some(prompt_template.to_string()),
            mode,
            coords,
            ..SegmentOptions::default()
        };
        let target = Target::Query(sample.query.clone());
        let gt = item.mask()?;
        let mut answers = Vec::with_capacity(2);
        for model in [reference, candidate] {
            let mut config = model.generation_config().clone();
            config.do_sample = false;
            let result = segment(model, &image, &target, &config, None, &options, |_| {})?;
            let output = result.output;
            let score = score_answer(&output.text, &gt, item.bbox, mode, coords, BoxSource::Mask)?;
            answers.push((output, result.segmentation.mask, score.iou));
        }
        let (b, a) = (answers.remove(1), answers.remove(0));
        out.push(AgreementSample {
            ref_id: sample.ref_id,
            sent_id: sample.sent_id,
            mask_iou: mask_iou(&a.1, &b.1)?,
            iou_reference: a.2,
            iou_candidate: b.2,
            token_agreement: common_prefix_share(&a.0.token_ids, &b.0.token_ids),
            answer_reference: a.0.text,
            answer_candidate: b.0.text,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(summarize(out))
}

/// The summary figures of compared samples.
pub fn summarize(samples: Vec<AgreementSample>) -> Agreement {
    let n = samples.len();
    let mean = |f: &dyn Fn(&AgreementSample) -> f64| {
        if n == 0 {
            0.0
        } else {
            samples.iter().map(f).sum::<f64>() / n as f64
        }
    };
    Agreement {
        n,
        mean_mask_iou: mean(&|s| s.mask_iou),
        share_at_least_0_9: mean(&|s| f64::from(u8::from(s.mask_iou >= 0.9))),
        giou_reference: mean(&|s| s.iou_reference),
        giou_candidate: mean(&|s| s.iou_candidate),
        token_agreement: mean(&|s| s.token_agreement),
        identical_answers: mean(&|s| f64::from(u8::from(s.answer_reference == s.answer_candidate))),
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_prefix_share() {
        assert_eq!(common_prefix_share(&[1, 2, 3, 4], &[1, 2, 9]), 0.5);
        assert_eq!(common_prefix_share(&[], &[]), 1.0);
        assert_eq!(common_prefix_share(&[5], &[]), 0.0);
    }

    #[test]
    fn summary_figures() {
        let sample = |mask_iou: f64, same: bool| AgreementSample {
            ref_id: 0,
            sent_id: 0,
            mask_iou,
            iou_reference: 0.5,
            iou_candidate: 0.25,
            token_agreement: 1.0,
            answer_reference: "a".into(),
            answer_candidate: if same { "a".into() } else { "b".into() },
        };
        let s = summarize(vec![sample(1.0, true), sample(0.5, false)]);
        assert_eq!(s.n, 2);
        assert_eq!(s.mean_mask_iou, 0.75);
        assert_eq!(s.share_at_least_0_9, 0.5);
        assert_eq!(s.giou_candidate, 0.25);
        assert_eq!(s.identical_answers, 0.5);
    }
}
