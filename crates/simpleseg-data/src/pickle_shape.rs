//! A pickle's shape, measured before it is unpickled.
//!
//! Unpickling builds values recursively and copies a memoized value at every reference to it,
//! so a small hostile pickle can overflow the stack (lists nested thousands deep) or expand
//! exponentially (lists of references to lists of references...). This module runs the
//! pickle machine over the opcodes without building any value: it tracks which container
//! holds which, as a graph, then measures the nesting depth and the number of values the
//! unpickled result would hold, iteratively. [`check`] refuses a pickle over the bounds
//! before serde-pickle sees it. Nothing is executed: globals and reductions are only counted.

use std::fmt;

/// Deepest nesting accepted (the refer pickles nest 6 deep).
pub const MAX_DEPTH: u64 = 64;
/// Most values an unpickled result may hold, memo references expanded (the refCOCOg refs
/// hold a few million).
pub const MAX_VALUES: u64 = 64_000_000;

/// Why a pickle is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum ShapeError {
    /// Not a pickle this reader understands (truncated, unknown opcode, stack underflow).
    Malformed(String),
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep(u64),
    /// More values than [`MAX_VALUES`] once memo references are expanded.
    TooManyValues(u64),
    /// A container that holds itself.
    Recursive,
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShapeError::Malformed(m) => write!(f, "not a readable pickle: {m}"),
            ShapeError::TooDeep(d) => write!(
                f,
                "the pickle nests values {d} deep; more than {MAX_DEPTH} is refused"
            ),
            ShapeError::TooManyValues(n) => write!(
                f,
                "the pickle expands to {n} values; more than {MAX_VALUES} is refused"
            ),
            ShapeError::Recursive => write!(f, "the pickle holds a container that contains itself"),
        }
    }
}

/// The stack's element that stands for every scalar.
const LEAF: u32 = u32::MAX;

/// A container of the pickle: the containers it holds, and how many scalars.
#[derive(Default)]
struct Container {
    children: Vec<u32>,
    leaves: u64,
}

struct Machine<'a> {
    bytes: &'a [u8],
    pos: usize,
    stack: Vec<u32>,
    marks: Vec<usize>,
    memo: std::collections::HashMap<u64, u32>,
    containers: Vec<Container>,
}

type Step<T> = Result<T, ShapeError>;

fn malformed<T>(message: impl Into<String>) -> Step<T> {
    Err(ShapeError::Malformed(message.into()))
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> Step<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return malformed("truncated");
        };
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn uint(&mut self, n: usize) -> Step<u64> {
        let b = self.take(n)?;
        Ok(b.iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    fn line(&mut self) -> Step<&[u8]> {
        let rest = &self.bytes[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return malformed("truncated line");
        };
        self.take(n + 1)
    }

    /// A memo index written as a decimal line (PUT, GET).
    fn line_index(&mut self) -> Step<u64> {
        let line = self.line()?;
        let text = std::str::from_utf8(&line[..line.len() - 1]).ok();
        match text.and_then(|t| t.trim().parse::<u64>().ok()) {
            Some(id) => Ok(id),
            None => malformed("bad memo index"),
        }
    }

    /// Skips a length-prefixed argument whose length takes `n` bytes.
    fn skip_counted(&mut self, n: usize) -> Step<()> {
        let len = self.uint(n)?;
        let len = usize::try_from(len).or_else(|_| malformed("length out of range"))?;
        self.take(len).map(|_| ())
    }

    fn pop(&mut self) -> Step<u32> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return malformed("stack underflow at a mark");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => malformed("stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> Step<Vec<u32>> {
        let Some(mark) = self.marks.pop() else {
            return malformed("no mark");
        };
        Ok(self.stack.split_off(mark))
    }

    fn top(&self) -> Step<u32> {
        match self.stack.last() {
            Some(&v) if self.marks.last().is_none_or(|&m| m < self.stack.len()) => Ok(v),
            _ => malformed("stack underflow"),
        }
    }

    fn new_container(&mut self, items: &[u32]) -> Step<u32> {
        let id = u32::try_from(self.containers.len())
            .ok()
            .filter(|&id| id != LEAF)
            .ok_or(ShapeError::TooManyValues(u64::MAX))?;
        self.containers.push(Container::default());
        self.add_to(id, items)?;
        Ok(id)
    }

    /// Puts `items` into the container `target` (the top of the stack for APPEND and kin).
    fn add_to(&mut self, target: u32, items: &[u32]) -> Step<()> {
        if target == LEAF {
            // Appending to a scalar: the unpickler refuses it.
            return malformed("items added to a value that is not a container");
        }
        let c = &mut self.containers[target as usize];
        for &item in items {
            if item == LEAF {
                c.leaves += 1;
            } else {
                c.children.push(item);
            }
        }
        Ok(())
    }

    fn wrap(&mut self, n: usize) -> Step<()> {
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            items.push(self.pop()?);
        }
        items.reverse();
        let id = self.new_container(&items)?;
        self.stack.push(id);
        Ok(())
    }

    fn memo_put(&mut self, id: u64) -> Step<()> {
        let top = self.top()?;
        self.memo.insert(id, top);
        Ok(())
    }

    fn memo_get(&mut self, id: u64) -> Step<()> {
        match self.memo.get(&id) {
            Some(&v) => {
                self.stack.push(v);
                Ok(())
            }
            None => malformed(format!("memo entry {id} was never stored")),
        }
    }

    /// Runs to the STOP opcode; returns the result's element.
    fn run(&mut self) -> Step<u32> {
        loop {
            let op = self.take(1)?[0];
            match op {
                // Scalars.
                b'N' | 0x88 | 0x89 => self.stack.push(LEAF),
                b'I' | b'L' | b'F' | b'S' | b'V' | b'P' => {
                    self.line()?;
                    self.stack.push(LEAF);
                }
                b'J' => self.push_after(4)?,
                b'K' => self.push_after(1)?,
                b'M' => self.push_after(2)?,
                b'G' => self.push_after(8)?,
                0x82 => self.push_after(1)?,
                0x83 => self.push_after(2)?,
                0x84 => self.push_after(4)?,
                0x8a | b'U' | b'C' | 0x8c => self.push_counted(1)?,
                0x8b | b'T' | b'X' | b'B' => self.push_counted(4)?,
                0x8d | 0x8e | 0x96 => self.push_counted(8)?,
                b'c' => {
                    self.line()?;
                    self.line()?;
                    self.stack.push(LEAF);
                }
                0x93 => {
                    self.pop()?;
                    self.pop()?;
                    self.stack.push(LEAF);
                }
                b'Q' => {
                    self.pop()?;
                    self.stack.push(LEAF);
                }
                0x97 => self.stack.push(LEAF),
                0x98 => {
                    self.top()?;
                }
                // Framing.
                0x80 => {
                    self.take(1)?;
                }
                0x95 => {
                    self.take(8)?;
                }
                // Stack manipulation.
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    if self.marks.last().is_some_and(|&m| m == self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                // Containers.
                b']' | b'}' | b')' | 0x8f => {
                    let id = self.new_container(&[])?;
                    self.stack.push(id);
                }
                b'l' | b't' | b'd' | 0x91 | b'o' => {
                    let items = self.pop_mark()?;
                    let id = self.new_container(&items)?;
                    self.stack.push(id);
                }
                b'i' => {
                    self.line()?;
                    self.line()?;
                    let items = self.pop_mark()?;
                    let id = self.new_container(&items)?;
                    self.stack.push(id);
                }
                0x85 => self.wrap(1)?,
                0x86 => self.wrap(2)?,
                0x87 => self.wrap(3)?,
                // Reductions keep what they were given, as far as sizes go.
                b'R' | 0x81 => self.wrap(2)?,
                0x92 => self.wrap(3)?,
                b'a' => {
                    let item = self.pop()?;
                    let target = self.top()?;
                    self.add_to(target, &[item])?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?;
                    self.add_to(target, &[key, value])?;
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?;
                    if target != LEAF {
                        self.add_to(target, &[state])?;
                    }
                }
                b'e' | b'u' | 0x90 => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.add_to(target, &items)?;
                }
                // Memo.
                b'p' => {
                    let id = self.line_index()?;
                    self.memo_put(id)?;
                }
                b'q' => {
                    let id = self.uint(1)?;
                    self.memo_put(id)?;
                }
                b'r' => {
                    let id = self.uint(4)?;
                    self.memo_put(id)?;
                }
                0x94 => {
                    let id = self.memo.len() as u64;
                    self.memo_put(id)?;
                }
                b'g' => {
                    let id = self.line_index()?;
                    self.memo_get(id)?;
                }
                b'h' => {
                    let id = self.uint(1)?;
                    self.memo_get(id)?;
                }
                b'j' => {
                    let id = self.uint(4)?;
                    self.memo_get(id)?;
                }
                b'.' => return self.pop(),
                other => return malformed(format!("unknown opcode 0x{other:02x}")),
            }
        }
    }

    fn push_after(&mut self, n: usize) -> Step<()> {
        self.take(n)?;
        self.stack.push(LEAF);
        Ok(())
    }

    fn push_counted(&mut self, n: usize) -> Step<()> {
        self.skip_counted(n)?;
        self.stack.push(LEAF);
        Ok(())
    }

    /// Depth and expanded value count of `root`, by an iterative depth-first walk.
    fn measure(&self, root: u32) -> Step<(u64, u64)> {
        if root == LEAF {
            return Ok((1, 1));
        }
        const NEW: u8 = 0;
        const OPEN: u8 = 1;
        const DONE: u8 = 2;
        let n = self.containers.len();
        let mut state = vec![NEW; n];
        let mut depth = vec![0u64; n];
        let mut values = vec![0u64; n];
        // (container, index of the next child to visit)
        let mut walk: Vec<(u32, usize)> = vec![(root, 0)];
        state[root as usize] = OPEN;
        while let Some(top) = walk.last_mut() {
            let id = top.0;
            let c = &self.containers[id as usize];
            if let Some(&child) = c.children.get(top.1) {
                top.1 += 1;
                match state[child as usize] {
                    NEW => {
                        state[child as usize] = OPEN;
                        walk.push((child, 0));
                    }
                    OPEN => return Err(ShapeError::Recursive),
                    _ => {}
                }
                continue;
            }
            // All children measured.
            let (mut d, mut v) = (u64::from(c.leaves > 0), 1u64.saturating_add(c.leaves));
            for &child in &c.children {
                d = d.max(depth[child as usize]);
                v = v.saturating_add(values[child as usize]);
            }
            depth[id as usize] = d + 1;
            values[id as usize] = v;
            state[id as usize] = DONE;
            walk.pop();
        }
        Ok((depth[root as usize], values[root as usize]))
    }
}

/// Refuses a pickle that is malformed, nested deeper than [`MAX_DEPTH`], expands to more
/// than [`MAX_VALUES`] values or contains itself; returns its depth and value count.
pub fn check(bytes: &[u8]) -> Result<(u64, u64), ShapeError> {
    let mut machine = Machine {
        bytes,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: std::collections::HashMap::new(),
        containers: Vec::new(),
    };
    let root = machine.run()?;
    let (depth, values) = machine.measure(root)?;
    if depth > MAX_DEPTH {
        return Err(ShapeError::TooDeep(depth));
    }
    if values > MAX_VALUES {
        return Err(ShapeError::TooManyValues(values));
    }
    Ok((depth, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pickle<T: serde::Serialize>(value: &T) -> Vec<u8> {
        serde_pickle::to_vec(value, serde_pickle::SerOptions::new().proto_v2()).unwrap()
    }

    #[test]
    fn measures_what_serde_pickle_writes() {
        let value = vec![vec![1, 2], vec![3]];
        // list -> lists -> ints.
        assert_eq!(check(&pickle(&value)).unwrap(), (3, 6));
        assert_eq!(check(&pickle(&"text")).unwrap(), (1, 1));
    }

    #[test]
    fn refuses_deep_nesting_and_memo_bombs() {
        // PROTO 2, then 10,000 EMPTY_LIST + APPEND-nested lists, then STOP.
        let mut deep = vec![0x80, 2];
        deep.extend(std::iter::repeat_n(b']', 10_000));
        deep.extend(std::iter::repeat_n(b'a', 9_999));
        deep.push(b'.');
        assert_eq!(check(&deep), Err(ShapeError::TooDeep(10_000)));
        // Each list holds two references to the previous one: 2^40 values from 200 bytes.
        let mut bomb = vec![0x80, 2, b']', b'q', 0];
        for i in 1..=40u8 {
            bomb.extend([b']', b'h', i - 1, b'a', b'h', i - 1, b'a', b'q', i]);
        }
        bomb.push(b'.');
        assert!(matches!(check(&bomb), Err(ShapeError::TooManyValues(_))));
        // A list that contains itself.
        let cyclic = [0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.'];
        assert_eq!(check(&cyclic), Err(ShapeError::Recursive));
        assert!(matches!(
            check(&[0x80, 2, b']']),
            Err(ShapeError::Malformed(_))
        ));
        assert!(matches!(check(b"a."), Err(ShapeError::Malformed(_))));
    }
}
