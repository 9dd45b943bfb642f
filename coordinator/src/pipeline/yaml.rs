//! A YAML document as a tree whose every node knows its line and column.
//!
//! serde-saphyr does the YAML work (syntax, anchors and aliases, merge keys, duplicate keys, and the
//! budgets that stop alias bombs and runaway nesting). Deserializing into typed structs would stop at the
//! first problem, so instead the document becomes this small tree and `parse` validates it by hand,
//! reporting every problem with the position of the node it concerns.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, NonFiniteFloatPolicy, Spanned};

use super::PipelineError;

/// One YAML node and where it starts (1-based).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Node {
    /// The node's content.
    pub(super) value: Value,
    /// 1-based line of the node (for an alias: of the alias).
    pub(super) line: u32,
    /// 1-based column of the node.
    pub(super) column: u32,
}

/// The content of a node.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    /// `~`, `null` or nothing at all.
    Null,
    /// A string, number or boolean.
    Scalar(Scalar),
    /// A sequence, in order.
    Seq(Vec<Node>),
    /// A mapping's entries (key, value), in file order.
    Map(Vec<(Node, Node)>),
}

/// A scalar with its text as written and the type YAML gave it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Scalar {
    /// The text: a string's value, or a number or boolean exactly as spelled in the file, so that
    /// `version: 3.10` stays "3.10" rather than becoming "3.1".
    pub(super) text: String,
    /// The type YAML resolved.
    pub(super) kind: ScalarKind,
}

/// The YAML type of a scalar.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum ScalarKind {
    /// A string (quoted, or plain text that is not a number or boolean).
    Str,
    /// `true` / `false` (YAML 1.2 spellings only).
    Bool,
    /// An integer, with its value.
    Int(i128),
    /// A floating-point number.
    Float,
}

impl Node {
    /// The scalar's text, when this is a scalar.
    pub(super) fn scalar_text(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar(s) => Some(&s.text),
            _ => None,
        }
    }

    /// How the node reads in an error message: "a string", "a list", ...
    pub(super) fn kind_name(&self) -> &'static str {
        match &self.value {
            Value::Null => "nothing (null)",
            Value::Scalar(s) => match s.kind {
                ScalarKind::Str => "a string",
                ScalarKind::Bool => "a boolean",
                ScalarKind::Int(_) | ScalarKind::Float => "a number",
            },
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Parse one YAML document into a tree. A syntax error comes back with the position the YAML library
/// reports.
pub(super) fn load(src: &str) -> Result<Node, PipelineError> {
    let options = serde_saphyr::options! {
        // Positions are reported separately; a rendered snippet would repeat them inside the message.
        with_snippet: false,
        // YAML 1.1 booleans turn `os: no` or a job named `y` into a boolean; keep them as text.
        strict_booleans: true,
        // `0755`, `1_000` and `.inf` are more likely text (modes, versions) than numbers here.
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
        non_finite_float_policy: NonFiniteFloatPolicy::AsString,
    };
    match serde_saphyr::from_str_with_options::<Spanned<RawNode>>(src, options) {
        Ok(raw) => Ok(into_node(raw, src)),
        Err(err) => Err(syntax_error(&err)),
    }
}

fn syntax_error(err: &serde_saphyr::Error) -> PipelineError {
    let (line, column) = err
        .location()
        .map(|at| (to_u32(at.line()), to_u32(at.column())))
        .unwrap_or((0, 0));
    let mut message = err.to_string();
    // The library appends the position to its message; it is carried in line/column instead.
    let suffix = format!(" at line {line}, column {column}");
    if line != 0 && message.ends_with(&suffix) {
        message.truncate(message.len() - suffix.len());
    }
    PipelineError {
        line,
        column,
        message: format!("invalid YAML: {message}"),
    }
}

fn to_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The tree as serde sees it; converted to [`Node`] once the source text is at hand.
#[derive(Debug)]
enum RawNode {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<RawNode>>),
    Map(Vec<(Spanned<RawNode>, Spanned<RawNode>)>),
}

impl<'de> Deserialize<'de> for RawNode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = RawNode;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E>(self, v: bool) -> Result<RawNode, E> {
        Ok(RawNode::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<RawNode, E> {
        Ok(RawNode::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<RawNode, E> {
        Ok(RawNode::Int(v.into()))
    }

    fn visit_i128<E>(self, v: i128) -> Result<RawNode, E> {
        Ok(RawNode::Int(v))
    }

    fn visit_u128<E>(self, v: u128) -> Result<RawNode, E> {
        // Beyond i128 only matters for its text, which is recovered from the source anyway.
        Ok(i128::try_from(v).map_or(RawNode::Float(v as f64), RawNode::Int))
    }

    fn visit_f64<E>(self, v: f64) -> Result<RawNode, E> {
        Ok(RawNode::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<RawNode, E> {
        Ok(RawNode::Str(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<RawNode, E> {
        Ok(RawNode::Str(v))
    }

    fn visit_bytes<E>(self, v: &[u8]) -> Result<RawNode, E> {
        // `!!binary` scalars: nothing in a pipeline is binary, keep what can be shown.
        Ok(RawNode::Str(String::from_utf8_lossy(v).into_owned()))
    }

    fn visit_unit<E>(self) -> Result<RawNode, E> {
        Ok(RawNode::Null)
    }

    fn visit_none<E>(self) -> Result<RawNode, E> {
        Ok(RawNode::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<RawNode, D::Error> {
        RawNode::deserialize(deserializer)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<RawNode, D::Error> {
        RawNode::deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawNode, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(RawNode::Seq(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawNode, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry()? {
            entries.push(entry);
        }
        Ok(RawNode::Map(entries))
    }
}

/// Recursion is bounded by the YAML library's nesting budget (64 levels by default).
fn into_node(raw: Spanned<RawNode>, src: &str) -> Node {
    let written = written_text(src, &raw.defined);
    let scalar = |kind, fallback: String| {
        Value::Scalar(Scalar {
            text: written.clone().unwrap_or(fallback),
            kind,
        })
    };
    let value = match raw.value {
        RawNode::Null => Value::Null,
        RawNode::Str(text) => Value::Scalar(Scalar {
            text,
            kind: ScalarKind::Str,
        }),
        RawNode::Bool(b) => scalar(ScalarKind::Bool, b.to_string()),
        RawNode::Int(n) => scalar(ScalarKind::Int(n), n.to_string()),
        RawNode::Float(x) => scalar(ScalarKind::Float, x.to_string()),
        RawNode::Seq(items) => Value::Seq(items.into_iter().map(|i| into_node(i, src)).collect()),
        RawNode::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (into_node(k, src), into_node(v, src)))
                .collect(),
        ),
    };
    Node {
        value,
        line: to_u32(raw.referenced.line()),
        column: to_u32(raw.referenced.column()),
    }
}

/// A plain scalar's spelling in the source, e.g. "3.10" for a float the library read as 3.1.
fn written_text(src: &str, at: &Location) -> Option<String> {
    let span = at.span();
    let start = usize::try_from(span.byte_offset()?).ok()?;
    let len = usize::try_from(span.byte_len()?).ok()?;
    let text = src.get(start..start.checked_add(len)?)?;
    // Anything that is not the bare scalar (an alias, anchor or tag) means the span is not what we think.
    let bare =
        !text.is_empty() && !text.starts_with(['*', '&', '!']) && !text.contains(['\n', '#']);
    bare.then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(node: &Node) -> Vec<(String, u32, u32)> {
        match &node.value {
            Value::Map(entries) => entries
                .iter()
                .map(|(_, v)| (v.scalar_text().unwrap_or("?").to_owned(), v.line, v.column))
                .collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn scalars_keep_their_spelling_and_position() {
        let node =
            load("a: 3.10\nb: yes\nc: 0x10\nd: &v 1.50\ne: *v\nf: \"q\"\ng: true\n").unwrap();
        assert_eq!(
            texts(&node),
            vec![
                ("3.10".to_owned(), 1, 4),
                ("yes".to_owned(), 2, 4),
                ("0x10".to_owned(), 3, 4),
                ("1.50".to_owned(), 4, 7),
                ("1.50".to_owned(), 5, 4),
                ("q".to_owned(), 6, 4),
                ("true".to_owned(), 7, 4),
            ]
        );
    }

    #[test]
    fn syntax_errors_carry_the_reported_position() {
        let err = load("a: [1, 2\n").unwrap_err();
        assert_eq!((err.line, err.column), (1, 4));
        assert!(err.message.starts_with("invalid YAML: "), "{}", err.message);
        assert!(!err.message.contains("at line"), "{}", err.message);
    }

    #[test]
    fn empty_document_is_null() {
        assert_eq!(load("").unwrap().value, Value::Null);
        assert_eq!(load("# only a comment\n").unwrap().value, Value::Null);
    }
}
