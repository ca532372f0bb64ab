//! Constrained decoding: the sampler may only pick tokens that keep the answer a prefix of a
//! string a regular expression matches, and may only stop where the answer matches in full.
//!
//! The expression is compiled to a byte-level DFA (regex-automata). Each token's bytes are
//! known ([`TokenBytes`]); a token is allowed in a DFA state when walking its bytes from that
//! state never reaches the dead state, and the stop tokens are allowed only in states where
//! the answer so far matches. The allowed set of a state is computed once (a pass over the
//! vocabulary) and kept: the presets' DFAs have a few dozen states, so after the first answers
//! a step costs a lookup.
//!
//! Presets: [`Grammar::polygon`] (the point protocol with normalized numbers of at most three
//! decimals, one or more polygons, at least one of three points or more) and
//! [`Grammar::bbox`], each bare or in the answer forms the released data script trains.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use regex_automata::dfa::{dense, Automaton};
use regex_automata::util::primitives::StateID;
use regex_automata::{Anchored, Input};
use simpleseg_core::templates::ANSWER_TEMPLATES;

use crate::error::{Error, Result};
use crate::text::TextTokenizer;

/// The most memory a preset's automaton may take to build and to keep.
const DFA_BYTES: usize = 64 << 20;

/// Bounds on a constraint a request brings: the pattern's length, checked before it is
/// parsed, and the memory (so also the time) its automaton may take to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatternLimits {
    pub max_pattern_bytes: usize,
    pub max_automaton_bytes: usize,
}

impl Default for PatternLimits {
    /// Patterns of 16 KiB, automata of 16 MiB (a few tenths of a second to build at most).
    fn default() -> Self {
        PatternLimits {
            max_pattern_bytes: 16 << 10,
            max_automaton_bytes: 16 << 20,
        }
    }
}

/// A normalized coordinate as SimpleSeg writes them: 0 or 1, or a fraction with 1-3 decimals.
const NUMBER: &str = r"(?:0(?:\.[0-9]{1,3})?|1(?:\.0{1,3})?)";

/// `body` bare, or in one of the answer forms the released data script trains
/// ([`ANSWER_TEMPLATES`]: `{a}.`, `Sure, you can find it at {a}.`, `It is found at {a}.`,
/// `It is at {a}.`), exactly: those prefixes and the final period, nothing else.
fn answer_forms(body: &str) -> String {
    let mut forms = vec![body.to_string()];
    for template in ANSWER_TEMPLATES {
        if let Some((before, after)) = template.split_once("{a}") {
            let form = format!(
                "{}{body}{}",
                regex_syntax::escape(before),
                regex_syntax::escape(after)
            );
            if !forms.contains(&form) {
                forms.push(form);
            }
        }
    }
    format!("(?:{})", forms.join("|"))
}

/// Every token's bytes (`None` for tokens that are not whole UTF-8 text, never allowed) and
/// the stop tokens.
#[derive(Clone, Debug)]
pub struct TokenBytes {
    bytes: Vec<Option<Vec<u8>>>,
    stop: Vec<u32>,
}

impl TokenBytes {
    /// The vocabulary of `tokenizer`, with `stop` as the stop tokens (special tokens other than
    /// those are never allowed: their text is not the answer's).
    pub fn new(tokenizer: &TextTokenizer, stop: &[u32]) -> Result<Self> {
        let n = tokenizer.vocab_size();
        let mut bytes = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let text = tokenizer.decode(&[id])?;
            let whole = !text.is_empty() && !text.contains('\u{FFFD}') && !stop.contains(&id);
            bytes.push(whole.then(|| text.into_bytes()));
        }
        Ok(TokenBytes {
            bytes,
            stop: stop.to_vec(),
        })
    }
}

/// A compiled constraint: the DFA and the allowed tokens per state.
pub struct Grammar {
    name: String,
    dfa: dense::DFA<Vec<u32>>,
    tokens: Arc<TokenBytes>,
    allowed: Mutex<HashMap<StateID, Arc<Allowed>>>,
}

/// The tokens a state allows: a flag per token id, and the allowed ids (few, mid-answer).
#[derive(Debug)]
pub struct Allowed {
    flags: Vec<bool>,
    ids: Vec<u32>,
}

impl Allowed {
    /// The allowed ids, in order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

impl std::ops::Index<usize> for Allowed {
    type Output = bool;

    fn index(&self, id: usize) -> &bool {
        &self.flags[id]
    }
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Grammar({})", self.name)
    }
}

impl Grammar {
    /// Answers a full match of `pattern` accepts (anchored at both ends).
    pub fn regex(name: &str, pattern: &str, tokens: Arc<TokenBytes>) -> Result<Self> {
        Grammar::regex_within(
            name,
            pattern,
            tokens,
            PatternLimits {
                max_pattern_bytes: usize::MAX,
                max_automaton_bytes: DFA_BYTES,
            },
        )
    }

    /// [`Grammar::regex`] for a pattern from a request: its length is checked before it is
    /// parsed, and building stops with an error once the automaton would outgrow `limits`.
    pub fn regex_within(
        name: &str,
        pattern: &str,
        tokens: Arc<TokenBytes>,
        limits: PatternLimits,
    ) -> Result<Self> {
        if pattern.len() > limits.max_pattern_bytes {
            return Err(Error::Input(format!(
                "constraint {name}: the pattern has {} bytes; at most {} are allowed",
                pattern.len(),
                limits.max_pattern_bytes
            )));
        }
        let size = Some(limits.max_automaton_bytes);
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .start_kind(regex_automata::dfa::StartKind::Anchored)
                    .dfa_size_limit(size)
                    .determinize_size_limit(size),
            )
            .syntax(regex_automata::util::syntax::Config::new().nest_limit(64))
            .thompson(regex_automata::nfa::thompson::Config::new().nfa_size_limit(size))
            // Anchored at the end too: a DFA reports a match one byte late, so without the
            // anchor a token running past a complete answer would look allowed.
            .build(&format!("(?:{pattern})\\z"))
            .map_err(|e| Error::Input(format!("constraint {name}: {e}")))?;
        Ok(Grammar {
            name: name.to_string(),
            dfa,
            tokens,
            allowed: Mutex::new(HashMap::new()),
        })
    }

    /// The polygon answer: `[[[x, y], [x, y], [x, y], ...]]`, several polygons separated by
    /// `, `, at least one of three points or more, bare or in one of the trained answer forms
    /// (`{a}.`, `It is at {a}.`, ...).
    pub fn polygon(tokens: Arc<TokenBytes>) -> Result<Self> {
        let point = format!(r"\[{NUMBER}, {NUMBER}\]");
        // The data script writes every contour, one- and two-point ones too (the parser skips
        // those, as pycocotools cannot draw them); at least one polygon has three points.
        let short = format!(r"\[{point}(?:, {point})?\]");
        let polygon = format!(r"\[{point}(?:, {point}){{2,}}\]");
        let any = format!(r"\[{point}(?:, {point})*\]");
        Grammar::regex(
            "polygon",
            &answer_forms(&format!(r"\[(?:{short}, )*{polygon}(?:, {any})*\]")),
            tokens,
        )
    }

    /// A box answer: `[x1, y1, x2, y2]`, bare or in one of the trained answer forms.
    pub fn bbox(tokens: Arc<TokenBytes>) -> Result<Self> {
        Grammar::regex(
            "box",
            &answer_forms(&format!(r"\[{NUMBER}, {NUMBER}, {NUMBER}, {NUMBER}\]")),
            tokens,
        )
    }

    /// The constraint's name (`polygon`, `box`, `regex`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The state before any output.
    pub fn start(&self) -> Result<StateID> {
        self.dfa
            .start_state_forward(&Input::new("").anchored(Anchored::Yes))
            .map_err(|e| Error::Input(format!("constraint {}: {e}", self.name)))
    }

    fn walk(&self, mut state: StateID, bytes: &[u8]) -> Option<StateID> {
        for &b in bytes {
            state = self.dfa.next_state(state, b);
            if self.dfa.is_dead_state(state) || self.dfa.is_quit_state(state) {
                return None;
            }
        }
        Some(state)
    }

    /// Whether the output so far (which led to `state`) is a complete answer.
    pub fn accepts(&self, state: StateID) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(state))
    }

    /// Whether `text` is a whole answer the constraint accepts.
    pub fn matches(&self, text: &str) -> bool {
        self.start()
            .ok()
            .and_then(|start| self.walk(start, text.as_bytes()))
            .is_some_and(|end| self.accepts(end))
    }

    /// The tokens allowed in `state`, by id.
    pub fn allowed(&self, state: StateID) -> Arc<Allowed> {
        if let Some(mask) = self
            .allowed
            .lock()
            .ok()
            .and_then(|m| m.get(&state).cloned())
        {
            return mask;
        }
        let accepts = self.accepts(state);
        let mut mask: Vec<bool> = self
            .tokens
            .bytes
            .iter()
            .map(|b| b.as_ref().is_some_and(|b| self.walk(state, b).is_some()))
            .collect();
        for &s in &self.tokens.stop {
            if let Some(m) = mask.get_mut(s as usize) {
                *m = accepts;
            }
        }
        let ids = (0u32..)
            .zip(&mask)
            .filter_map(|(id, &ok)| ok.then_some(id))
            .collect();
        let mask = Arc::new(Allowed { flags: mask, ids });
        if let Ok(mut m) = self.allowed.lock() {
            m.insert(state, mask.clone());
        }
        mask
    }

    /// The state after `token` (`None` for a stop token or one the state does not allow).
    pub fn advance(&self, state: StateID, token: u32) -> Option<StateID> {
        let bytes = self.tokens.bytes.get(token as usize)?.as_ref()?;
        self.walk(state, bytes)
    }
}

/// Where one answer is in its grammar.
#[derive(Clone, Debug)]
pub struct Constrained {
    grammar: Arc<Grammar>,
    state: StateID,
}

impl Constrained {
    pub fn new(grammar: Arc<Grammar>) -> Result<Self> {
        let state = grammar.start()?;
        Ok(Constrained { grammar, state })
    }

    /// Sets the logits of disallowed tokens to -inf. When the model's vocabulary is larger
    /// than the tokenizer's (padding rows), the extra ids are disallowed too. Returns `false`
    /// (the logits untouched) when no token is allowed.
    #[must_use]
    pub fn mask(&self, logits: &mut [f32]) -> bool {
        let allowed = self.grammar.allowed(self.state);
        // Few tokens are allowed mid-answer: keep theirs, fill the rest (a memset).
        let kept: Vec<(usize, f32)> = allowed
            .ids
            .iter()
            .filter_map(|&id| logits.get(id as usize).map(|&l| (id as usize, l)))
            .collect();
        if kept.is_empty() {
            return false;
        }
        logits.fill(f32::NEG_INFINITY);
        for (id, l) in kept {
            logits[id] = l;
        }
        true
    }

    /// The one token allowed next, when exactly one is and it is within the model's
    /// `vocab` (then masking leaves only it, and any sampler takes it).
    pub fn forced(&self, vocab: usize) -> Option<u32> {
        match self.grammar.allowed(self.state).ids[..] {
            [only] if (only as usize) < vocab => Some(only),
            _ => None,
        }
    }

    /// Moves past a chosen token (a stop token ends the answer and changes nothing).
    pub fn advance(&mut self, token: u32) {
        if let Some(next) = self.grammar.advance(self.state, token) {
            self.state = next;
        }
    }
}

/// A constraint on answers: a preset or a regular expression.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Constraint {
    Polygon,
    Box,
    Regex(String),
}

impl std::str::FromStr for Constraint {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "polygon" => Ok(Constraint::Polygon),
            "box" => Ok(Constraint::Box),
            other => Err(format!(
                "unknown constraint '{other}' (expected polygon or box)"
            )),
        }
    }
}

/// How many compiled constraints a [`GrammarCache`] keeps.
const CACHED_GRAMMARS: usize = 64;

/// The compiled constraints of one model, kept for reuse: presets and request patterns alike,
/// and their failures too, so that a pattern that failed to build fails at once after. Safe
/// to share between threads; building happens outside the lock.
pub struct GrammarCache {
    limits: PatternLimits,
    /// Constraints built (successfully or not) and answered from the cache, for metrics.
    pub builds: std::sync::atomic::AtomicUsize,
    pub hits: std::sync::atomic::AtomicUsize,
    tokens: Mutex<Option<Arc<TokenBytes>>>,
    entries: Mutex<std::collections::VecDeque<(Constraint, Built)>>,
}

/// A constraint's grammar, or why it could not be built.
type Built = std::result::Result<Arc<Grammar>, String>;

impl GrammarCache {
    /// A cache building request patterns within `limits`.
    pub fn new(limits: PatternLimits) -> Self {
        GrammarCache {
            limits,
            builds: Default::default(),
            hits: Default::default(),
            tokens: Mutex::new(None),
            entries: Mutex::new(std::collections::VecDeque::new()),
        }
    }

    /// The grammar of `constraint` for a model with this tokenizer and these stop tokens.
    /// Errors when the pattern is over the limits, does not compile, or allows no first
    /// token (no answer could begin).
    pub fn get(
        &self,
        tokenizer: &TextTokenizer,
        stop: &[u32],
        constraint: &Constraint,
    ) -> Result<Arc<Grammar>> {
        let found = self.entries.lock().ok().and_then(|entries| {
            entries
                .iter()
                .find(|(c, _)| c == constraint)
                .map(|(_, g)| g.clone())
        });
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(found) = found {
            self.hits.fetch_add(1, Relaxed);
            return found.map_err(Error::Input);
        }
        self.builds.fetch_add(1, Relaxed);
        let built = self.build(tokenizer, stop, constraint);
        let kept = match &built {
            Ok(g) => Ok(g.clone()),
            Err(Error::Input(message)) => Err(message.clone()),
            // Not a property of the pattern: try again next time.
            Err(_) => return built,
        };
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CACHED_GRAMMARS {
                entries.pop_front();
            }
            entries.push_back((constraint.clone(), kept));
        }
        built
    }

    fn build(
        &self,
        tokenizer: &TextTokenizer,
        stop: &[u32],
        constraint: &Constraint,
    ) -> Result<Arc<Grammar>> {
        let tokens = {
            let mut cached = self
                .tokens
                .lock()
                .map_err(|_| Error::Input("the constraint cache is unusable".into()))?;
            match cached.as_ref() {
                Some(t) => t.clone(),
                None => {
                    let t = Arc::new(TokenBytes::new(tokenizer, stop)?);
                    *cached = Some(t.clone());
                    t
                }
            }
        };
        let grammar = match constraint {
            Constraint::Polygon => Grammar::polygon(tokens)?,
            Constraint::Box => Grammar::bbox(tokens)?,
            Constraint::Regex(pattern) => {
                Grammar::regex_within("regex", pattern, tokens, self.limits)?
            }
        };
        if grammar.allowed(grammar.start()?).ids.is_empty() {
            return Err(Error::Input(format!(
                "constraint {}: no token of this model's vocabulary can begin an answer it accepts",
                grammar.name()
            )));
        }
        Ok(Arc::new(grammar))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocabulary(tokens: &[&str], stop: u32) -> Arc<TokenBytes> {
        let mut bytes: Vec<Option<Vec<u8>>> =
            tokens.iter().map(|t| Some(t.as_bytes().to_vec())).collect();
        bytes[stop as usize] = None;
        Arc::new(TokenBytes {
            bytes,
            stop: vec![stop],
        })
    }

    /// Feeds `text` token by token (greedy longest match over the test vocabulary).
    fn allowed_path(g: &Grammar, vocab: &[&str], pieces: &[&str]) -> (bool, StateID) {
        let mut state = g.start().unwrap();
        for piece in pieces {
            let id = vocab.iter().position(|t| t == piece).unwrap() as u32;
            if !g.allowed(state)[id as usize] {
                return (false, state);
            }
            state = g.advance(state, id).unwrap();
        }
        (true, state)
    }

    #[test]
    fn presets_accept_the_trained_answer_forms_exactly() {
        let g = Grammar::polygon(vocabulary(&["<eos>", "x"], 0)).unwrap();
        let a = "[[[0.1, 0.25], [0.9, 0.1], [0.5, 1.0]]]";
        for form in [
            a.to_string(),
            format!("{a}."),
            format!("Sure, you can find it at {a}."),
            format!("It is found at {a}."),
            format!("It is at {a}."),
        ] {
            assert!(g.matches(&form), "{form}");
        }
        for form in [
            format!("It is at {a}"),
            format!("It's at {a}."),
            format!("Sure, you can find it at {a}.."),
            format!(" {a}."),
            "It is at .".to_string(),
        ] {
            assert!(!g.matches(&form), "{form}");
        }
        let b = Grammar::bbox(vocabulary(&["<eos>", "x"], 0)).unwrap();
        assert!(b.matches("It is found at [0.1, 0.2, 0.3, 0.4]."));
        assert!(!b.matches("It is found at [0.1, 0.2, 0.3]."));
    }

    #[test]
    fn polygon_grammar_allows_answers_and_their_prefixes_only() {
        let vocab = [
            "<eos>", "[", "[[", "[[[", "]", "]]", "]]]", ", ", ",", " ", "0", "1", "0.", ".", "5",
            "12", "123", "4", "9", "]].", "x",
        ];
        let g = Grammar::polygon(vocabulary(&vocab, 0)).unwrap();
        let answer = [
            "[[[", "0.", "5", ", ", "0.", "12", "]", ", ", "[", "1", ", ", "0", "]", ", ", "[",
            "0.", "123", ", ", "0.", "9", "]]]", ".",
        ];
        let (ok, end) = allowed_path(&g, &vocab, &answer);
        assert!(ok);
        assert!(g.accepts(end));
        assert!(g.allowed(end)[0], "the stop token is allowed at the end");
        // Mid-answer, stopping is not allowed, nor are letters, nor a fourth decimal.
        let (_, mid) = allowed_path(&g, &vocab, &answer[..5]);
        assert!(!g.allowed(mid)[0]);
        assert!(!g.allowed(mid)[20]);
        let (ok, _) = allowed_path(&g, &vocab, &["[[[", "0.", "123", "4"]);
        assert!(!ok, "at most three decimals");
        // A two-point polygon alone is not an answer: the data script writes such contours,
        // so one may come, but a polygon of three points or more must follow.
        let (ok, short) = allowed_path(
            &g,
            &vocab,
            &["[[[", "0", ", ", "0", "]", ", ", "[", "1", ", ", "1", "]]"],
        );
        assert!(ok);
        let close = vocab.iter().position(|t| *t == "]").unwrap();
        assert!(!g.allowed(short)[0] && !g.allowed(short)[close]);
        let (ok, _) = allowed_path(&g, &vocab, &["[[[", "0", ", ", "0", "]]]"]);
        assert!(!ok, "a one-point polygon alone");
        // Numbers above 1 are refused.
        let (ok, _) = allowed_path(&g, &vocab, &["[[[", "12"]);
        assert!(!ok);
    }

    #[test]
    fn nothing_may_follow_a_complete_answer() {
        let vocab = ["<eos>", "a", "b", "bb", "x"];
        let g = Grammar::regex("regex", "ab", vocabulary(&vocab, 0)).unwrap();
        let (ok, after_a) = allowed_path(&g, &vocab, &["a"]);
        assert!(ok);
        let allowed = g.allowed(after_a);
        assert!(allowed[2], "b completes the answer");
        assert!(!allowed[3], "bb runs past it");
        assert!(!allowed[0], "no stop before the end");
        let (ok, end) = allowed_path(&g, &vocab, &["a", "b"]);
        assert!(ok && g.accepts(end));
        let allowed = g.allowed(end);
        assert!(allowed[0] && !allowed[1] && !allowed[2] && !allowed[4]);
    }

    #[test]
    fn dead_ends_are_reported_not_sampled() {
        // `[` then a character no token writes: the answer can start but not go on.
        let vocab = ["<eos>", "[", "a"];
        let g = Grammar::regex("regex", "\\[\u{1F600}", vocabulary(&vocab, 0)).unwrap();
        let mut c = Constrained::new(Arc::new(g)).unwrap();
        let mut logits = vec![0f32; 3];
        assert!(c.mask(&mut logits));
        assert_eq!(logits[1], 0.0);
        c.advance(1);
        let mut logits = vec![0.5f32; 3];
        assert!(!c.mask(&mut logits), "nothing is allowed after [");
        assert_eq!(logits, [0.5; 3], "the logits are left as they were");
    }

    #[test]
    fn oversized_patterns_fail_before_parsing_and_automata_stay_bounded() {
        let tokens = vocabulary(&["<eos>", "a", "b"], 0);
        let limits = PatternLimits {
            max_pattern_bytes: 100,
            max_automaton_bytes: 1 << 20,
        };
        let err =
            Grammar::regex_within("regex", &"a".repeat(101), tokens.clone(), limits).unwrap_err();
        assert!(err.to_string().contains("101 bytes"), "{err}");
        // 2^30 states: determinization stops at the size limit with an error.
        let err = Grammar::regex_within("regex", "(a|b)*a(a|b){30}", tokens, limits).unwrap_err();
        assert!(matches!(err, Error::Input(_)), "{err}");
    }

    #[test]
    fn box_grammar() {
        let vocab = ["<eos>", "[", "0.", "5", ", ", "1", "]", "]."];
        let g = Grammar::bbox(vocabulary(&vocab, 0)).unwrap();
        let (ok, end) = allowed_path(
            &g,
            &vocab,
            &["[", "0.", "5", ", ", "0.", "5", ", ", "1", ", ", "1", "]"],
        );
        assert!(ok && g.accepts(end));
        let mut c = Constrained::new(Arc::new(g)).unwrap();
        let mut logits = vec![0f32; vocab.len() + 2];
        assert!(c.mask(&mut logits));
        assert_eq!(logits[1], 0.0, "[ opens the box");
        assert!(logits[0].is_infinite() && logits[9].is_infinite());
        c.advance(1);
        let mut logits = vec![0f32; vocab.len()];
        assert!(c.mask(&mut logits));
        assert!(logits[1].is_infinite() && logits[2] == 0.0);
    }
}
