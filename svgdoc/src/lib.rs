//! A tiny SVG writer for the project's pictures (`vmm inspect --map`, the benchmark charts):
//! rectangles, text and lines with escaped content, and [`check_well_formed`], a structural XML
//! check the tests of both pictures use. No dependency: the pictures are simple and a plotting
//! library would be most of the binary.

mod check;

pub use check::{check_well_formed, XmlError, XmlSummary};

use std::fmt::Write;

/// Text anchoring (`text-anchor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    /// Text starts at x.
    Start,
    /// Text is centred on x.
    Middle,
    /// Text ends at x.
    End,
}

impl Anchor {
    fn as_str(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

/// An SVG document being written; [`Svg::finish`] returns its text.
#[derive(Debug)]
pub struct Svg {
    body: String,
    width_px: f64,
    height_px: f64,
}

impl Svg {
    /// An empty `width_px` × `height_px` picture with a white background.
    pub fn new(width_px: f64, height_px: f64) -> Self {
        let mut svg = Self {
            body: String::new(),
            width_px,
            height_px,
        };
        svg.rect(0.0, 0.0, width_px, height_px, "#ffffff", None);
        svg
    }

    /// A filled rectangle; `title` becomes its tooltip.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, title: Option<&str>) {
        let _ = write!(
            self.body,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{}""#,
            num(x),
            num(y),
            num(w),
            num(h),
            escape(fill)
        );
        match title {
            Some(t) => {
                let _ = writeln!(self.body, "><title>{}</title></rect>", escape(t));
            }
            None => self.body.push_str("/>\n"),
        }
    }

    /// An unfilled rectangle outline.
    pub fn frame(&mut self, x: f64, y: f64, w: f64, h: f64, stroke: &str) {
        let _ = writeln!(
            self.body,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="{}" stroke-width="1"/>"#,
            num(x),
            num(y),
            num(w),
            num(h),
            escape(stroke)
        );
    }

    /// A line one pixel wide.
    pub fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="1"/>"#,
            num(x1),
            num(y1),
            num(x2),
            num(y2),
            escape(stroke)
        );
    }

    /// Text in a sans-serif font of `size_px`, `bold` or not.
    pub fn text(
        &mut self,
        x: f64,
        y: f64,
        size_px: f64,
        anchor: Anchor,
        bold: bool,
        content: &str,
    ) {
        let _ = writeln!(
            self.body,
            r#"<text x="{}" y="{}" font-family="sans-serif" font-size="{}" text-anchor="{}"{}>{}</text>"#,
            num(x),
            num(y),
            num(size_px),
            anchor.as_str(),
            if bold { r#" font-weight="bold""# } else { "" },
            escape(content)
        );
    }

    /// The document's text.
    pub fn finish(self) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\">\n{}</svg>\n",
            self.body,
            w = num(self.width_px),
            h = num(self.height_px),
        )
    }
}

/// A coordinate with at most two decimals and no trailing zeros.
fn num(v: f64) -> String {
    let v = if v.is_finite() { v } else { 0.0 };
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Escapes `&`, `<`, `>`, `"` and `'` for XML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_with_hostile_text_is_well_formed() {
        let mut svg = Svg::new(100.0, 50.0);
        svg.rect(1.0, 2.5, 3.0, 4.0, "#ff0000", Some("a <b> & \"c\""));
        svg.text(10.0, 20.0, 12.0, Anchor::Middle, true, "x < y && z\u{1}");
        svg.line(0.0, 0.0, 10.0, 10.0, "#000");
        svg.frame(0.0, 0.0, 10.0, 10.0, "#000");
        let text = svg.finish();
        let summary = check_well_formed(&text).unwrap();
        assert_eq!(summary.root, "svg");
        assert_eq!(summary.count("rect"), 3);
        assert_eq!(summary.count("text"), 1);
        assert_eq!(summary.texts, vec!["a <b> & \"c\"", "x < y && z "]);
        assert_eq!(num(2.5), "2.5");
        assert_eq!(num(3.0), "3");
        assert_eq!(num(f64::NAN), "0");
    }
}
