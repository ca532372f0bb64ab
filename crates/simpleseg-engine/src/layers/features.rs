//! Image features among text tokens: how a vision-language model puts an image's features
//! where the prompt holds its placeholder tokens.

use candle_core::Tensor;

/// Embeddings `(batch, seq, hidden)` with the row of each `placeholder` token replaced, in
/// order, by the rows of `features` (`(placeholders, hidden)`): how a vision-language model
/// puts image features where the prompt holds the image's placeholder tokens.
pub fn merge_image_features(
    embeds: &Tensor,
    input_ids: &Tensor,
    placeholder: u32,
    features: &Tensor,
) -> crate::error::Result<Tensor> {
    let (b, s, d) = embeds.dims3()?;
    let ids: Vec<u32> = input_ids.flatten_all()?.to_vec1()?;
    let n_placeholders = ids.iter().filter(|&&t| t == placeholder).count();
    if n_placeholders != features.dim(0)? {
        return Err(crate::error::Error::Input(format!(
            "image features and image tokens do not match: {} features, {n_placeholders} tokens",
            features.dim(0)?
        )));
    }
    let mut next = b * s;
    let gather: Vec<u32> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            if t == placeholder {
                next += 1;
                (next - 1) as u32
            } else {
                i as u32
            }
        })
        .collect();
    let table = Tensor::cat(
        &[
            &embeds.reshape((b * s, d))?,
            &features.to_dtype(embeds.dtype())?,
        ],
        0,
    )?;
    let gather = Tensor::new(gather.as_slice(), embeds.device())?;
    Ok(table.index_select(&gather, 0)?.reshape((b, s, d))?)
}
