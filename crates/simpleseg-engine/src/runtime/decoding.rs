//! One answer's decoding state, stepped the same way by every decoding loop: batched
//! generation, the server's scheduler and training's rollouts.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::runtime::constraint::{Constrained, Grammar};
use crate::runtime::model::StopReason;
use crate::runtime::sampling::{GenerationConfig, Sampler};

/// One answer's decoding state: its sampler, constraint and tokens so far. Every decoding loop
/// steps every row through it ([`crate::runtime::generator::Generator`]), so a row decodes the
/// same in all of them.
pub(crate) struct Decoding {
    sampler: Sampler,
    constraint: Option<Constrained>,
    /// Prompt and generated tokens (the repetition penalty looks at both).
    history: Vec<u32>,
    pub(crate) generated: Vec<u32>,
    stop: Vec<u32>,
    pub(crate) stop_reason: Option<StopReason>,
    /// The stop token that ended the answer, when one did.
    pub(crate) stop_token: Option<u32>,
    max_new: usize,
}

impl Decoding {
    /// A row for `prompt_ids`; it stops at `max_new_tokens` or where the sequence reaches
    /// `max_positions`, whichever comes first. A prompt that fills the context is an error.
    pub(crate) fn new(
        config: &GenerationConfig,
        prompt_ids: &[u32],
        max_positions: usize,
        grammar: Option<Arc<Grammar>>,
    ) -> Result<Self> {
        if prompt_ids.len() >= max_positions {
            return Err(Error::Input(format!(
                "the prompt has {} tokens and the model's context is {max_positions}: no room for an answer",
                prompt_ids.len()
            )));
        }
        let max_new = config.max_new_tokens.min(max_positions - prompt_ids.len());
        Ok(Decoding {
            sampler: Sampler::new(config.clone())?,
            constraint: grammar.map(Constrained::new).transpose()?,
            history: prompt_ids.to_vec(),
            generated: Vec::new(),
            stop: config.eos_token_ids.clone(),
            stop_reason: (max_new == 0).then_some(StopReason::MaxTokens),
            stop_token: None,
            max_new,
        })
    }

    /// Picks the next token from this row's logits. `None` when it is a stop token (the row
    /// ends with [`StopReason::Eos`]) or when the constraint allows no token (it ends
    /// with [`StopReason::NoAllowedToken`]: nothing unchecked is ever chosen);
    /// otherwise the token is recorded, and the row ends with `MaxTokens` when it was the last
    /// one allowed.
    pub(crate) fn choose(&mut self, mut logits: Vec<f32>) -> Option<u32> {
        if let Some(c) = &self.constraint {
            if !c.mask(&mut logits) {
                self.stop_reason = Some(StopReason::NoAllowedToken);
                return None;
            }
        }
        let token = self
            .sampler
            .next_token(&mut logits, &self.history, self.generated.len());
        self.accept(token)
    }

    /// The token the constraint forces next (the only one it allows, within a `vocab`-wide
    /// model): `choose` would take it whatever the logits, so it needs none.
    pub(crate) fn forced(&self, vocab: usize) -> Option<u32> {
        self.constraint.as_ref()?.forced(vocab)
    }

    /// Takes the [`forced`](Self::forced) token exactly as [`choose`](Self::choose) would have
    /// on any logits (the sampler's draw included): `None` when it is a stop token.
    pub(crate) fn take_forced(&mut self, token: u32) -> Option<u32> {
        self.sampler.take_only_allowed();
        self.accept(token)
    }

    /// Records a chosen token (see [`choose`](Self::choose)).
    fn accept(&mut self, token: u32) -> Option<u32> {
        if self.stop.contains(&token) {
            self.stop_reason = Some(StopReason::Eos);
            self.stop_token = Some(token);
            return None;
        }
        if let Some(c) = self.constraint.as_mut() {
            c.advance(token);
        }
        self.generated.push(token);
        self.history.push(token);
        if self.generated.len() >= self.max_new {
            self.stop_reason = Some(StopReason::MaxTokens);
        }
        Some(token)
    }
}
