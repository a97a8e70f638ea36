//! A structural XML check: tags balance, attributes are quoted, text holds no raw `<` or bare
//! `&`. Enough to catch a broken writer; not a validating parser.

use std::collections::BTreeMap;

/// What is wrong with a document, and where (byte offset).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// A tag never ends.
    #[error("unterminated tag at byte {0}")]
    Unterminated(usize),
    /// A closing tag does not match the open element.
    #[error("closing tag </{found}> at byte {at} does not match <{expected}>")]
    Mismatch {
        /// The element open there.
        expected: String,
        /// The closing tag found.
        found: String,
        /// Byte offset.
        at: usize,
    },
    /// An attribute is not `name="value"`.
    #[error("malformed attribute in <{tag}> at byte {at}")]
    Attribute {
        /// The element.
        tag: String,
        /// Byte offset of the tag.
        at: usize,
    },
    /// A bare `&` or unknown entity.
    #[error("bad entity at byte {0}")]
    Entity(usize),
    /// Elements left open at the end, or more than one root.
    #[error("document structure: {0}")]
    Structure(String),
}

/// What a well-formed document holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct XmlSummary {
    /// The root element's name.
    pub root: String,
    /// Elements by name.
    pub elements: BTreeMap<String, usize>,
    /// The text of every `<text>` and `<title>` element, unescaped, in document order.
    pub texts: Vec<String>,
}

impl XmlSummary {
    /// How many `name` elements the document has.
    pub fn count(&self, name: &str) -> usize {
        self.elements.get(name).copied().unwrap_or(0)
    }
}

fn unescape(text: &str, at: usize) -> Result<String, XmlError> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(';').ok_or(XmlError::Entity(at + i))?;
        out.push(match &rest[i + 1..i + end] {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => return Err(XmlError::Entity(at + i)),
        });
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks `doc` and summarises it.
pub fn check_well_formed(doc: &str) -> Result<XmlSummary, XmlError> {
    let mut summary = XmlSummary::default();
    let mut stack: Vec<String> = Vec::new();
    let mut pos = 0;
    let mut text_start = 0;
    while let Some(rel) = doc[pos..].find('<') {
        let at = pos + rel;
        let text = unescape(&doc[text_start..at], text_start)?;
        if matches!(stack.last().map(String::as_str), Some("text" | "title")) {
            summary.texts.push(text);
        } else if stack.is_empty() && !text.trim().is_empty() {
            return Err(XmlError::Structure(format!(
                "text outside the root at byte {text_start}"
            )));
        }
        let (close, end) = if doc[at..].starts_with("<?") {
            ("?>", doc[at..].find("?>"))
        } else if doc[at..].starts_with("<!--") {
            ("-->", doc[at..].find("-->"))
        } else {
            (">", doc[at..].find('>'))
        };
        let end = at + end.ok_or(XmlError::Unterminated(at))?;
        let inner = &doc[at + 1..end];
        pos = end + close.len();
        text_start = pos;
        if inner.starts_with('?') || inner.starts_with("!--") {
            continue;
        }
        if let Some(name) = inner.strip_prefix('/') {
            let name = name.trim();
            match stack.pop() {
                Some(open) if open == name => continue,
                open => {
                    return Err(XmlError::Mismatch {
                        expected: open.unwrap_or_default(),
                        found: name.to_string(),
                        at,
                    })
                }
            }
        }
        let self_closing = inner.ends_with('/');
        let inner = inner.trim_end_matches('/');
        let name_end = inner.find(char::is_whitespace).unwrap_or(inner.len());
        let name = &inner[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_alphanumeric() || "-_:".contains(c))
        {
            return Err(XmlError::Unterminated(at));
        }
        check_attributes(&inner[name_end..], name, at)?;
        if stack.is_empty() {
            if !summary.root.is_empty() {
                return Err(XmlError::Structure(format!(
                    "second root <{name}> at byte {at}"
                )));
            }
            summary.root = name.to_string();
        }
        *summary.elements.entry(name.to_string()).or_default() += 1;
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    if !doc[text_start..].trim().is_empty() {
        return Err(XmlError::Structure("text after the root".into()));
    }
    if let Some(open) = stack.last() {
        return Err(XmlError::Structure(format!("<{open}> is never closed")));
    }
    if summary.root.is_empty() {
        return Err(XmlError::Structure("no root element".into()));
    }
    Ok(summary)
}

/// `name="value"` pairs separated by whitespace, values escaped.
fn check_attributes(mut attrs: &str, tag: &str, at: usize) -> Result<(), XmlError> {
    let bad = || XmlError::Attribute {
        tag: tag.to_string(),
        at,
    };
    loop {
        attrs = attrs.trim_start();
        if attrs.is_empty() {
            return Ok(());
        }
        let eq = attrs.find('=').ok_or_else(bad)?;
        let name = attrs[..eq].trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(bad());
        }
        let rest = &attrs[eq + 1..];
        let quote = rest
            .chars()
            .next()
            .filter(|c| *c == '"' || *c == '\'')
            .ok_or_else(bad)?;
        let close = rest[1..].find(quote).ok_or_else(bad)?;
        let value = &rest[1..1 + close];
        if value.contains('<') {
            return Err(bad());
        }
        unescape(value, at)?;
        attrs = &rest[close + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broken_documents_are_refused() {
        assert!(check_well_formed("<svg><rect/></svg>").is_ok());
        assert!(matches!(
            check_well_formed("<svg><g></svg>"),
            Err(XmlError::Mismatch { .. })
        ));
        assert!(matches!(
            check_well_formed("<svg>"),
            Err(XmlError::Structure(_))
        ));
        assert!(matches!(
            check_well_formed("<svg a=b/>"),
            Err(XmlError::Attribute { .. })
        ));
        assert!(matches!(
            check_well_formed("<svg>a & b</svg>"),
            Err(XmlError::Entity(_))
        ));
        assert!(matches!(
            check_well_formed("<svg><rect"),
            Err(XmlError::Unterminated(_))
        ));
        assert!(matches!(
            check_well_formed("<a/><b/>"),
            Err(XmlError::Structure(_))
        ));
    }
}
