//! JSON-schema-constrained decoding: the core an in-process decoder drives
//! so that sampling only allowed tokens always yields JSON that parses and
//! follows the schema.
//!
//! [`JsonConstraint`] compiles a schema (the subset below) against a
//! vocabulary (token id -> the text the token decodes to). A decoder keeps
//! one [`ConstraintState`] per sequence and, at every step, masks the
//! logits with [`JsonConstraint::allowed_tokens`], samples, and calls
//! [`JsonConstraint::advance`]; once [`JsonConstraint::is_complete`], only
//! the end-of-sequence token is allowed.
//!
//! The automaton works on characters: a token is allowed when feeding its
//! characters one by one keeps the text a prefix of a conforming document.
//! Every prefix it accepts can be completed as long as the vocabulary has
//! single-character tokens for the structural characters (`{ } [ ] " , :`)
//! and for the characters of enum values, which every real tokenizer has.
//!
//! [`JsonConstraint::allowed_tokens`] walks a character trie of the
//! vocabulary built once per constraint, so tokens sharing a prefix are
//! tried together and a refused prefix rules out every token below it; in
//! structural positions only a handful of subtrees survive the first
//! character, inside free strings most of the vocabulary is visited once.
//! Special tokens should be given as empty pieces (never allowed); the
//! end-of-sequence token is allowed exactly when the document is complete,
//! whatever its piece.
//!
//! Supported schema subset:
//! * `{"type": "string"}` with optional `enum` (strings), `minLength`,
//!   `maxLength` (in characters; an escape counts as one);
//! * `{"enum": [...]}` of strings;
//! * `{"type": "array", "items": S}` with optional `minItems`, `maxItems`;
//! * `{"type": "object", "properties": {...}, "required": [...]}`: exactly
//!   the required properties are generated, in the order of `required`
//!   (the order a `properties` object was written in is not kept by
//!   serde_json); optional properties are left out.
//!
//! Output is compact: no whitespace outside strings, so a model cannot
//! spend its tokens on blanks. Strings may not contain control characters
//! or `\u` escapes (a lone surrogate escape would not parse); other
//! characters are written as themselves. Other schema keywords are refused
//! rather than ignored, so a schema is never silently weakened.

use std::sync::Arc;

use serde_json::Value;

use crate::error::{AuthorError, Result};

/// Deepest schema nesting compiled.
const MAX_SCHEMA_DEPTH: usize = 32;

/// The character [`JsonConstraint::shortest_completion`] pads strings to
/// their `minLength` with.
const FILLER: char = 'x';

/// The token vocabulary: each id's decoded text.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocabulary {
    pieces: Vec<String>,
    eos: Option<u32>,
}

impl Vocabulary {
    /// `pieces[id]` is the text token `id` decodes to (empty for special
    /// tokens, which are never allowed); `eos` ends a sequence.
    pub fn new(pieces: Vec<String>, eos: Option<u32>) -> Self {
        Self { pieces, eos }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    /// True when there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The text of token `id`.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// The end-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
}

/// A compiled schema node.
#[derive(Clone, Debug, PartialEq)]
enum Node {
    Str {
        /// Allowed values as JSON-escaped contents (without quotes).
        enum_values: Option<Vec<String>>,
        min_len: u32,
        max_len: Option<u32>,
    },
    Arr {
        item: u32,
        min_items: u32,
        max_items: Option<u32>,
    },
    Obj {
        /// Child node of each generated property.
        children: Vec<u32>,
        /// Literal before property i (`{"k":` or `,"k":`), then the closing
        /// literal (`}`, or `{}` for an object without properties).
        literals: Vec<Vec<char>>,
    },
}

/// Where an array is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ArrPhase {
    /// After `[`: an element or `]`.
    Open,
    /// After `,`: an element.
    AfterComma,
    /// After an element: `,` or `]`.
    AfterItem,
}

/// One level of the automaton's stack. `Copy`, so that trying a token
/// from a state is a memory copy of a short stack.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Frame {
    /// A value of the node is about to start.
    Value(u32),
    /// Inside a string. For an enum, the text so far is the first
    /// `raw_len` bytes of enum value `enum_idx` (and of every value that
    /// shares them).
    Str {
        node: u32,
        chars: u32,
        escape: bool,
        enum_idx: u32,
        raw_len: u32,
    },
    /// Inside an array.
    Arr {
        node: u32,
        items: u32,
        phase: ArrPhase,
    },
    /// Inside an object: matching literal `prop` at character `pos`.
    Obj { node: u32, prop: u32, pos: u32 },
}

/// The automaton's state for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct ConstraintState {
    stack: Vec<Frame>,
    text: String,
    ended: bool,
}

impl ConstraintState {
    /// The text generated so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// True once the end-of-sequence token was accepted.
    pub fn ended(&self) -> bool {
        self.ended
    }
}

/// A schema compiled against a vocabulary; shareable between sequences.
#[derive(Clone, Debug)]
pub struct JsonConstraint {
    nodes: Vec<Node>,
    vocab: Arc<Vocabulary>,
    trie: Vec<TrieNode>,
}

/// A node of the character trie of the vocabulary's pieces: tokens that
/// share a prefix are tried together, and a prefix that leaves the
/// language rules out every token below it at once.
#[derive(Clone, Debug, Default)]
struct TrieNode {
    /// (character, child index), sorted by character.
    children: Vec<(char, u32)>,
    /// Tokens whose piece ends here.
    tokens: Vec<u32>,
}

/// The trie of every non-empty piece except the end-of-sequence token's.
fn build_trie(vocab: &Vocabulary) -> Vec<TrieNode> {
    let mut maps: Vec<std::collections::HashMap<char, u32>> = vec![Default::default()];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new()];
    for (id, piece) in vocab.pieces.iter().enumerate() {
        if piece.is_empty() || Some(id as u32) == vocab.eos {
            continue;
        }
        let mut at = 0usize;
        for c in piece.chars() {
            let next = maps.len() as u32;
            let child = *maps[at].entry(c).or_insert(next);
            if child == next {
                maps.push(Default::default());
                tokens.push(Vec::new());
            }
            at = child as usize;
        }
        tokens[at].push(id as u32);
    }
    maps.into_iter()
        .zip(tokens)
        .map(|(m, tokens)| {
            let mut children: Vec<(char, u32)> = m.into_iter().collect();
            children.sort_unstable();
            TrieNode { children, tokens }
        })
        .collect()
}

impl JsonConstraint {
    /// Compiles `schema` (the subset of the module documentation).
    pub fn new(schema: &Value, vocab: Arc<Vocabulary>) -> Result<Self> {
        let mut nodes = Vec::new();
        compile(schema, &mut nodes, 0, "#")?;
        let trie = build_trie(&vocab);
        Ok(Self { nodes, vocab, trie })
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Vocabulary {
        &self.vocab
    }

    /// The state before any token.
    pub fn start(&self) -> ConstraintState {
        ConstraintState {
            // compile() pushes the root first.
            stack: vec![Frame::Value(0)],
            text: String::new(),
            ended: false,
        }
    }

    /// True when the text so far is a whole conforming document.
    pub fn is_complete(&self, state: &ConstraintState) -> bool {
        state.stack.is_empty()
    }

    /// For every token id, whether it may come next: tokens whose text
    /// keeps the output a valid prefix, and the end-of-sequence token once
    /// the document is complete (then nothing else).
    pub fn allowed_tokens(&self, state: &ConstraintState) -> Vec<bool> {
        let mut allowed = vec![false; self.vocab.pieces.len()];
        let complete = self.is_complete(state);
        if let Some(eos) = self.vocab.eos {
            if let Some(a) = allowed.get_mut(eos as usize) {
                *a = complete && !state.ended;
            }
        }
        if complete || state.ended {
            return allowed;
        }
        // Depth-first over the trie: each edge is one character step from
        // its parent's state; a refused character prunes its subtree.
        let mut work: Vec<(u32, Vec<Frame>)> = vec![(0, state.stack.clone())];
        while let Some((at, stack)) = work.pop() {
            for &(c, child) in &self.trie[at as usize].children {
                let mut next = stack.clone();
                if !self.step(&mut next, c) {
                    continue;
                }
                let node = &self.trie[child as usize];
                for &t in &node.tokens {
                    allowed[t as usize] = true;
                }
                if !node.children.is_empty() {
                    work.push((child, next));
                }
            }
        }
        allowed
    }

    /// [`Self::allowed_tokens`] by trying every token on its own: the
    /// reference the trie walk is tested against.
    #[cfg(test)]
    fn allowed_tokens_naive(&self, state: &ConstraintState) -> Vec<bool> {
        let complete = self.is_complete(state);
        let mut scratch = Vec::with_capacity(state.stack.len() + 4);
        (0..self.vocab.pieces.len())
            .map(|id| {
                if Some(id as u32) == self.vocab.eos {
                    return complete && !state.ended;
                }
                let piece = &self.vocab.pieces[id];
                if complete || state.ended || piece.is_empty() {
                    return false;
                }
                scratch.clear();
                scratch.extend_from_slice(&state.stack);
                piece.chars().all(|c| self.step(&mut scratch, c))
            })
            .collect()
    }

    /// Appends `token`; an error (state unchanged) when it is not allowed.
    pub fn advance(&self, state: &mut ConstraintState, token: u32) -> Result<()> {
        if Some(token) == self.vocab.eos {
            if self.is_complete(state) && !state.ended {
                state.ended = true;
                return Ok(());
            }
            return Err(AuthorError::Constraint(format!(
                "end of sequence before the JSON document is complete (after {:?})",
                tail(&state.text)
            )));
        }
        let piece = self.vocab.piece(token).ok_or_else(|| {
            AuthorError::Constraint(format!(
                "token {token} is outside the vocabulary of {}",
                self.vocab.len()
            ))
        })?;
        if piece.is_empty() || state.ended || !self.feed(state, piece) {
            return Err(AuthorError::Constraint(format!(
                "token {token} ({piece:?}) may not follow {:?}",
                tail(&state.text)
            )));
        }
        Ok(())
    }

    /// Feeds `text` character by character; false (state unchanged) when
    /// it would leave the language.
    pub fn feed(&self, state: &mut ConstraintState, text: &str) -> bool {
        let mut stack = state.stack.clone();
        if text.chars().all(|c| self.step(&mut stack, c)) {
            state.stack = stack;
            state.text.push_str(text);
            true
        } else {
            false
        }
    }

    /// One character; false when it is not allowed (the stack is then
    /// garbage and must be dropped).
    fn step(&self, stack: &mut Vec<Frame>, c: char) -> bool {
        loop {
            let Some(top) = stack.last_mut() else {
                return false; // the document is complete
            };
            match top {
                Frame::Value(node) => {
                    let node = *node;
                    match &self.nodes[node as usize] {
                        Node::Str { .. } => {
                            if c != '"' {
                                return false;
                            }
                            *top = Frame::Str {
                                node,
                                chars: 0,
                                escape: false,
                                enum_idx: 0,
                                raw_len: 0,
                            };
                            return true;
                        }
                        Node::Arr { .. } => {
                            if c != '[' {
                                return false;
                            }
                            *top = Frame::Arr {
                                node,
                                items: 0,
                                phase: ArrPhase::Open,
                            };
                            return true;
                        }
                        Node::Obj { .. } => {
                            // The object's opening literal starts with '{'.
                            *top = Frame::Obj {
                                node,
                                prop: 0,
                                pos: 0,
                            };
                        }
                    }
                }
                Frame::Str {
                    node,
                    chars,
                    escape,
                    enum_idx,
                    raw_len,
                } => {
                    let Node::Str {
                        enum_values,
                        min_len,
                        max_len,
                    } = &self.nodes[*node as usize]
                    else {
                        return false;
                    };
                    if let Some(values) = enum_values {
                        // Contents are canonical JSON escapes, so an
                        // unescaped '"' can only be the closing quote.
                        let so_far = &values[*enum_idx as usize].as_bytes()[..*raw_len as usize];
                        let mut buf = [0u8; 4];
                        let next = c.encode_utf8(&mut buf).as_bytes();
                        let extends = values.iter().position(|v| {
                            let v = v.as_bytes();
                            v.starts_with(so_far) && v[so_far.len()..].starts_with(next)
                        });
                        if let Some(j) = extends {
                            *enum_idx = j as u32;
                            *raw_len += next.len() as u32;
                            return true;
                        }
                        if c == '"' && values.iter().any(|v| v.as_bytes() == so_far) {
                            stack.pop();
                            self.finish(stack);
                            return true;
                        }
                        return false;
                    }
                    if *escape {
                        if !matches!(c, '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') {
                            return false;
                        }
                        *escape = false;
                        *chars += 1;
                        return true;
                    }
                    let room = max_len.is_none_or(|m| *chars < m);
                    return match c {
                        '"' => {
                            if *chars < *min_len {
                                return false;
                            }
                            stack.pop();
                            self.finish(stack);
                            true
                        }
                        '\\' if room => {
                            *escape = true;
                            true
                        }
                        c if (c as u32) < 0x20 || !room || c == '\\' => false,
                        _ => {
                            *chars += 1;
                            true
                        }
                    };
                }
                Frame::Arr { node, items, phase } => {
                    let Node::Arr {
                        item,
                        min_items,
                        max_items,
                    } = &self.nodes[*node as usize]
                    else {
                        return false;
                    };
                    let more = max_items.is_none_or(|m| *items < m);
                    let may_close = *items >= *min_items;
                    match phase {
                        ArrPhase::Open | ArrPhase::AfterComma => {
                            if c == ']' && *phase == ArrPhase::Open && may_close {
                                stack.pop();
                                self.finish(stack);
                                return true;
                            }
                            if !more {
                                return false;
                            }
                            let item = *item;
                            stack.push(Frame::Value(item));
                        }
                        ArrPhase::AfterItem => {
                            if c == ',' && more {
                                *phase = ArrPhase::AfterComma;
                                return true;
                            }
                            if c == ']' && may_close {
                                stack.pop();
                                self.finish(stack);
                                return true;
                            }
                            return false;
                        }
                    }
                }
                Frame::Obj { node, prop, pos } => {
                    let Node::Obj { children, literals } = &self.nodes[*node as usize] else {
                        return false;
                    };
                    let literal = &literals[*prop as usize];
                    if literal.get(*pos as usize) != Some(&c) {
                        return false;
                    }
                    *pos += 1;
                    if (*pos as usize) < literal.len() {
                        return true;
                    }
                    match children.get(*prop as usize) {
                        Some(&child) => stack.push(Frame::Value(child)),
                        None => {
                            // The closing literal: the object is done.
                            stack.pop();
                            self.finish(stack);
                        }
                    }
                    return true;
                }
            }
        }
    }

    /// The shortest text that, fed from `state`, completes the document
    /// (empty when it is complete): closing what is open, the shortest enum
    /// values, `x` as filler for `minLength`, `minItems` items of the least
    /// size. A decoder with a token budget forces it once the budget only
    /// just covers it, so every answer parses even when the model never
    /// chooses to stop. Feeding a prefix of it leaves the rest as the new
    /// shortest completion, so forcing can proceed token by token.
    pub fn shortest_completion(&self, state: &ConstraintState) -> String {
        let mut out = String::new();
        let n = state.stack.len();
        for (i, frame) in state.stack.iter().enumerate().rev() {
            // Frames below the top have a child value in progress, which the
            // text already written completes.
            let top = i + 1 == n;
            match *frame {
                Frame::Value(node) => self.min_value(node, &mut out, 0),
                Frame::Str {
                    node,
                    chars,
                    escape,
                    enum_idx,
                    raw_len,
                } => {
                    if let Node::Str {
                        enum_values,
                        min_len,
                        ..
                    } = &self.nodes[node as usize]
                    {
                        match enum_values {
                            Some(values) => {
                                let so_far =
                                    &values[enum_idx as usize].as_bytes()[..raw_len as usize];
                                let rest = values
                                    .iter()
                                    .filter(|v| v.as_bytes().starts_with(so_far))
                                    .min_by_key(|v| v.len())
                                    .and_then(|v| v.get(raw_len as usize..))
                                    .unwrap_or("");
                                out.push_str(rest);
                            }
                            None => {
                                let mut chars = chars;
                                if escape {
                                    // `\"` is one escaped character.
                                    out.push('"');
                                    chars += 1;
                                }
                                for _ in chars..*min_len {
                                    out.push(FILLER);
                                }
                            }
                        }
                    }
                    out.push('"');
                }
                Frame::Arr { node, items, phase } => {
                    if let Node::Arr {
                        item, min_items, ..
                    } = &self.nodes[node as usize]
                    {
                        let mut items = items;
                        if !top {
                            items += 1;
                        } else if phase == ArrPhase::AfterComma {
                            self.min_value(*item, &mut out, 0);
                            items += 1;
                        }
                        while items < *min_items {
                            if items > 0 {
                                out.push(',');
                            }
                            self.min_value(*item, &mut out, 0);
                            items += 1;
                        }
                    }
                    out.push(']');
                }
                Frame::Obj { node, prop, pos } => {
                    if let Node::Obj { children, literals } = &self.nodes[node as usize] {
                        let mut next = prop as usize + 1;
                        if top {
                            let literal = &literals[prop as usize];
                            out.extend(literal.iter().skip(pos as usize));
                            if let Some(&child) = children.get(prop as usize) {
                                self.min_value(child, &mut out, 0);
                            } else {
                                next = literals.len();
                            }
                        }
                        for (p, literal) in literals.iter().enumerate().skip(next) {
                            out.extend(literal.iter());
                            if let Some(&child) = children.get(p) {
                                self.min_value(child, &mut out, 0);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Appends the smallest value of `node` (see
    /// [`Self::shortest_completion`]).
    fn min_value(&self, node: u32, out: &mut String, depth: usize) {
        if depth > MAX_SCHEMA_DEPTH {
            return; // compile() refuses deeper schemas
        }
        match &self.nodes[node as usize] {
            Node::Str {
                enum_values,
                min_len,
                ..
            } => {
                out.push('"');
                match enum_values {
                    Some(values) => {
                        if let Some(v) = values.iter().min_by_key(|v| v.len()) {
                            out.push_str(v);
                        }
                    }
                    None => out.extend(std::iter::repeat_n(FILLER, *min_len as usize)),
                }
                out.push('"');
            }
            Node::Arr {
                item, min_items, ..
            } => {
                out.push('[');
                for i in 0..*min_items {
                    if i > 0 {
                        out.push(',');
                    }
                    self.min_value(*item, out, depth + 1);
                }
                out.push(']');
            }
            Node::Obj { children, literals } => {
                for (p, literal) in literals.iter().enumerate() {
                    out.extend(literal.iter());
                    if let Some(&child) = children.get(p) {
                        self.min_value(child, out, depth + 1);
                    }
                }
            }
        }
    }

    /// Tells the parent of a completed value that it is complete.
    fn finish(&self, stack: &mut [Frame]) {
        match stack.last_mut() {
            Some(Frame::Arr { items, phase, .. }) => {
                *items += 1;
                *phase = ArrPhase::AfterItem;
            }
            Some(Frame::Obj { prop, pos, .. }) => {
                *prop += 1;
                *pos = 0;
            }
            _ => {}
        }
    }
}

/// The last few characters of `text`, for error messages.
fn tail(text: &str) -> String {
    let n = text.chars().count();
    text.chars().skip(n.saturating_sub(40)).collect()
}

/// Compiles `schema` into `nodes`, returning its index.
fn compile(schema: &Value, nodes: &mut Vec<Node>, depth: usize, at: &str) -> Result<u32> {
    let bad = |m: String| AuthorError::Schema(format!("{at}: {m}"));
    if depth > MAX_SCHEMA_DEPTH {
        return Err(bad("nested too deeply".into()));
    }
    let obj = schema
        .as_object()
        .ok_or_else(|| bad("a schema must be an object".into()))?;
    const KNOWN: &[&str] = &[
        "type",
        "enum",
        "minLength",
        "maxLength",
        "items",
        "minItems",
        "maxItems",
        "properties",
        "required",
        "additionalProperties",
        "description",
        "title",
    ];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(format!("keyword {k:?} is not supported")));
    }
    let count = |k: &str| -> Result<Option<u32>> {
        match obj.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| bad(format!("{k} must be a non-negative integer"))),
        }
    };
    let ty = match obj.get("type") {
        None if obj.contains_key("enum") => "string",
        None => return Err(bad("no \"type\"".into())),
        Some(t) => t
            .as_str()
            .ok_or_else(|| bad("\"type\" must be one string".into()))?,
    };
    let index = nodes.len() as u32;
    match ty {
        "string" => {
            let enum_values = match obj.get("enum") {
                None => None,
                Some(Value::Array(values)) if !values.is_empty() => Some(
                    values
                        .iter()
                        .map(|v| {
                            let s = v
                                .as_str()
                                .ok_or_else(|| bad("enum values must be strings".into()))?;
                            let encoded =
                                serde_json::to_string(s).map_err(|e| bad(e.to_string()))?;
                            Ok(encoded[1..encoded.len() - 1].to_string())
                        })
                        .collect::<Result<Vec<_>>>()?,
                ),
                Some(_) => return Err(bad("enum must be a non-empty array".into())),
            };
            let min_len = count("minLength")?.unwrap_or(0);
            let max_len = count("maxLength")?;
            if max_len.is_some_and(|m| m < min_len) {
                return Err(bad("maxLength < minLength".into()));
            }
            nodes.push(Node::Str {
                enum_values,
                min_len,
                max_len,
            });
        }
        "array" => {
            let items = obj
                .get("items")
                .ok_or_else(|| bad("an array needs \"items\"".into()))?;
            let min_items = count("minItems")?.unwrap_or(0);
            let max_items = count("maxItems")?;
            if max_items.is_some_and(|m| m < min_items) {
                return Err(bad("maxItems < minItems".into()));
            }
            nodes.push(Node::Arr {
                item: 0,
                min_items,
                max_items,
            });
            let item = compile(items, nodes, depth + 1, &format!("{at}/items"))?;
            if let Node::Arr { item: slot, .. } = &mut nodes[index as usize] {
                *slot = item;
            }
        }
        "object" => {
            let props = match obj.get("properties") {
                None => serde_json::Map::new(),
                Some(Value::Object(p)) => p.clone(),
                Some(_) => return Err(bad("\"properties\" must be an object".into())),
            };
            let required: Vec<String> = match obj.get("required") {
                None => Vec::new(),
                Some(Value::Array(r)) => r
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| bad("\"required\" must list strings".into()))
                    })
                    .collect::<Result<_>>()?,
                Some(_) => return Err(bad("\"required\" must be an array".into())),
            };
            nodes.push(Node::Obj {
                children: Vec::new(),
                literals: Vec::new(),
            });
            let mut children = Vec::new();
            let mut literals = Vec::new();
            for (i, name) in required.iter().enumerate() {
                if required[..i].contains(name) {
                    return Err(bad(format!("property {name:?} is required twice")));
                }
                let sub = props
                    .get(name)
                    .ok_or_else(|| bad(format!("required property {name:?} has no schema")))?;
                let child = compile(sub, nodes, depth + 1, &format!("{at}/properties/{name}"))?;
                let key = serde_json::to_string(name).map_err(|e| bad(e.to_string()))?;
                let open = if i == 0 { "{" } else { "," };
                literals.push(format!("{open}{key}:").chars().collect());
                children.push(child);
            }
            literals.push(
                if required.is_empty() { "{}" } else { "}" }
                    .chars()
                    .collect(),
            );
            nodes[index as usize] = Node::Obj { children, literals };
        }
        other => {
            return Err(bad(format!(
                "type {other:?} is not supported (string, array, object)"
            )))
        }
    }
    Ok(index)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use serde_json::json;

    fn chars_vocab() -> Arc<Vocabulary> {
        let mut pieces: Vec<String> = "{}[]\",:\\abcdeynos "
            .chars()
            .map(|c| c.to_string())
            .collect();
        let eos = pieces.len() as u32;
        pieces.push(String::new());
        Arc::new(Vocabulary::new(pieces, Some(eos)))
    }

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "b": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 2},
                "a": {"enum": ["yes", "no"]}
            },
            "required": ["b", "a"]
        })
    }

    #[test]
    fn accepts_exactly_the_conforming_documents() {
        let c = JsonConstraint::new(&schema(), chars_vocab()).unwrap();
        let accepts = |text: &str| {
            let mut s = c.start();
            c.feed(&mut s, text) && c.is_complete(&s)
        };
        assert!(accepts(r#"{"b":["abc"],"a":"yes"}"#));
        assert!(accepts(r#"{"b":["","a\"b"],"a":"no"}"#));
        for text in [
            r#"{"b":[],"a":"yes"}"#,            // minItems
            r#"{"b":["a","b","c"],"a":"yes"}"#, // maxItems
            r#"{"b":["abcd"],"a":"yes"}"#,      // maxLength
            r#"{"b":["a"],"a":"maybe"}"#,       // enum
            r#"{"a":"yes","b":["a"]}"#,         // order
            r#"{"b":["a"], "a":"yes"}"#,        // whitespace
            r#"{"b":["a"],"a":"yes"}x"#,        // trailing text
            r#"{"b":["\u0041"],"a":"yes"}"#,    // \u escapes
        ] {
            assert!(!accepts(text), "{text}");
        }
        let mut s = c.start();
        assert!(c.feed(&mut s, r#"{"b":["a"],"a":"ye"#));
        assert!(!c.is_complete(&s));
    }

    #[test]
    fn allowed_tokens_and_eos() {
        let vocab = chars_vocab();
        let c = JsonConstraint::new(&schema(), vocab.clone()).unwrap();
        let mut s = c.start();
        let allowed = c.allowed_tokens(&s);
        let names: Vec<&str> = (0..vocab.len())
            .filter(|&i| allowed[i])
            .map(|i| vocab.piece(i as u32).unwrap())
            .collect();
        assert_eq!(names, vec!["{"]);
        assert!(c.advance(&mut s, 1).is_err()); // '}'
        assert_eq!(s.text(), "");
        c.feed(&mut s, r#"{"b":["a"],"a":"n"#);
        let allowed = c.allowed_tokens(&s);
        let names: Vec<&str> = (0..vocab.len())
            .filter(|&i| allowed[i])
            .map(|i| vocab.piece(i as u32).unwrap())
            .collect();
        assert_eq!(names, vec!["o"]);
        let o = (0..vocab.len())
            .find(|&i| vocab.piece(i as u32) == Some("o"))
            .unwrap();
        c.advance(&mut s, o as u32).unwrap();
        let eos = vocab.eos().unwrap();
        assert!(
            c.advance(&mut s, eos).is_err(),
            "eos before the closing quote"
        );
        c.feed(&mut s, "\"}");
        assert!(c.is_complete(&s));
        let allowed = c.allowed_tokens(&s);
        assert!(allowed[eos as usize]);
        assert_eq!(allowed.iter().filter(|a| **a).count(), 1);
        c.advance(&mut s, eos).unwrap();
        assert!(s.ended());
        assert!(c.allowed_tokens(&s).iter().all(|a| !a));
        let v: Value = serde_json::from_str(s.text()).unwrap();
        assert_eq!(v, json!({"b": ["a"], "a": "no"}));
    }

    /// The shortest completion completes the document, and after its
    /// first character the rest is the new shortest completion.
    fn check_completion(c: &JsonConstraint, s: &ConstraintState) {
        let comp = c.shortest_completion(s);
        let mut done = s.clone();
        assert!(c.feed(&mut done, &comp), "{:?} + {comp:?}", s.text());
        assert!(c.is_complete(&done), "{:?} + {comp:?}", s.text());
        if let Some(first) = comp.chars().next() {
            let mut one = s.clone();
            assert!(c.feed(&mut one, &first.to_string()));
            assert_eq!(c.shortest_completion(&one), comp[first.len_utf8()..]);
        }
    }

    #[test]
    fn shortest_completions() {
        let c = JsonConstraint::new(&schema(), chars_vocab()).unwrap();
        let mut s = c.start();
        assert_eq!(c.shortest_completion(&s), r#"{"b":[""],"a":"no"}"#);
        c.feed(&mut s, r#"{"b":["a\"#);
        assert_eq!(c.shortest_completion(&s), r#"""],"a":"no"}"#);
        c.feed(&mut s, r#"n"],"a":"y"#);
        assert_eq!(c.shortest_completion(&s), r#"es"}"#);
        let q = JsonConstraint::new(
            &json!({"type": "array", "minItems": 2, "items": {"type": "string", "minLength": 2}}),
            chars_vocab(),
        )
        .unwrap();
        let mut s = q.start();
        assert_eq!(q.shortest_completion(&s), r#"["xx","xx"]"#);
        q.feed(&mut s, r#"["a"#);
        assert_eq!(q.shortest_completion(&s), r#"x","xx"]"#);
        q.feed(&mut s, r#"bc","#);
        assert_eq!(q.shortest_completion(&s), r#""xx"]"#);
    }

    #[test]
    fn trie_walk_equals_trying_every_token() {
        let mut pieces: Vec<String> = "{}[]\",:\\abcdeynos \n"
            .chars()
            .map(|c| c.to_string())
            .collect();
        for p in [
            "{\"", "\":[\"", "\",\"", "\"],\"", "\":\"", "\"}", "ye", "yes", "yes\"}", "no\"",
            "abc", "ab", "a\"", "\\\"", "é", "", "x",
        ] {
            pieces.push(p.to_string());
        }
        let eos = pieces.len() as u32;
        pieces.push("</s>".into());
        let vocab = Arc::new(Vocabulary::new(pieces, Some(eos)));
        let c = JsonConstraint::new(&schema(), vocab.clone()).unwrap();
        // A deterministic walk: always the allowed token with the largest
        // (id * 7919 + step) % 101, checking both methods at every step.
        for seed in 0..20u32 {
            let mut s = c.start();
            for step in 0..200u32 {
                let fast = c.allowed_tokens(&s);
                assert_eq!(fast, c.allowed_tokens_naive(&s), "after {:?}", s.text());
                if !s.ended() {
                    check_completion(&c, &s);
                }
                let Some(t) = (0..vocab.len() as u32)
                    .filter(|&t| fast[t as usize])
                    .max_by_key(|&t| (t * 7919 + step * 31 + seed * 17) % 101)
                else {
                    break;
                };
                c.advance(&mut s, t).unwrap();
                if s.ended() {
                    break;
                }
            }
        }
    }

    #[test]
    fn unsupported_schemas_are_refused() {
        let vocab = chars_vocab();
        for (schema, why) in [
            (json!({"type": "number"}), "not supported"),
            (json!({"type": "string", "pattern": "a+"}), "pattern"),
            (json!({"enum": [1, 2]}), "strings"),
            (json!({"type": "object", "required": ["x"]}), "no schema"),
            (json!({"type": "array"}), "items"),
            (json!({"type": ["string", "null"]}), "one string"),
            (
                json!({"type": "string", "minLength": 3, "maxLength": 2}),
                "maxLength",
            ),
        ] {
            let e = JsonConstraint::new(&schema, vocab.clone())
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{schema}: {e}");
        }
        let empty = JsonConstraint::new(&json!({"type": "object"}), vocab).unwrap();
        let mut s = empty.start();
        assert!(empty.feed(&mut s, "{}") && empty.is_complete(&s));
    }
}
