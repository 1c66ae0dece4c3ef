//! Parsing of Nagios plugin output, so that any existing plugin can serve as
//! a check and its performance data becomes metrics.
//!
//! The convention (Nagios 3 and later):
//!
//! ```text
//! SUMMARY | perfdata
//! LONG TEXT LINE 1
//! LONG TEXT LINE N | more perfdata
//! more perfdata lines
//! ```
//!
//! Parsing is forgiving: plugins in the wild get the format wrong in many
//! small ways, and a bad performance item must never cost the whole result.

use aramaki_protocol::agent::Metric;

/// Plugin output split into its parts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Parsed {
    /// The first line without performance data.
    pub summary: String,
    /// The remaining text lines without performance data.
    pub long_output: String,
    /// Every well-formed performance item, in order.
    pub metrics: Vec<Metric>,
}

/// Splits plugin output into summary, long output and metrics.
pub fn parse(output: &str) -> Parsed {
    let mut lines = output.lines();
    let first = lines.next().unwrap_or("");
    let (summary, first_perf) = split_perf(first);
    let mut perf = vec![first_perf.unwrap_or("")];
    let mut long = Vec::new();
    let mut in_perf = false;
    for line in lines {
        if in_perf {
            perf.push(line);
            continue;
        }
        // The first later `|` ends the long text; everything after is perfdata.
        let (text, rest) = split_perf(line);
        long.push(text.trim_end());
        if let Some(rest) = rest {
            perf.push(rest);
            in_perf = true;
        }
    }
    Parsed {
        summary: summary.trim().to_owned(),
        long_output: long.join("\n").trim_end().to_owned(),
        metrics: perf.into_iter().flat_map(parse_perfdata).collect(),
    }
}

/// Splits a line at its first `|` into text and performance data.
fn split_perf(line: &str) -> (&str, Option<&str>) {
    match line.split_once('|') {
        Some((text, perf)) => (text, Some(perf)),
        None => (line, None),
    }
}

/// Parses a run of space-separated performance items, skipping bad ones.
pub fn parse_perfdata(perf: &str) -> Vec<Metric> {
    items(perf)
        .iter()
        .filter_map(|item| parse_item(item))
        .collect()
}

/// Splits performance data into items: whitespace separates them, except
/// inside a quoted label.
fn items(perf: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut chars = perf.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' if quoted && chars.peek() == Some(&'\'') => {
                // A doubled quote inside a label stays doubled for parse_item.
                current.push_str("''");
                chars.next();
            }
            '\'' => {
                quoted = !quoted;
                current.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Parses one `'label'=value[UOM];[warn];[crit];[min];[max]` item.
fn parse_item(item: &str) -> Option<Metric> {
    let (name, rest) = split_label(item)?;
    let mut fields = rest.split(';');
    let (value, unit) = split_value(fields.next()?)?;
    let text = |f: Option<&str>| {
        f.map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let warn = text(fields.next());
    let crit = text(fields.next());
    let min = fields.next().and_then(leading_number);
    let max = fields.next().and_then(leading_number);
    Some(Metric {
        name,
        value,
        unit: unit.to_owned(),
        warn,
        crit,
        min,
        max,
    })
}

/// Reads the label, quoted or not, and returns it with the text after `=`.
fn split_label(item: &str) -> Option<(String, &str)> {
    let Some(quoted) = item.strip_prefix('\'') else {
        let (label, rest) = item.split_once('=')?;
        return (!label.is_empty()).then(|| (label.to_owned(), rest));
    };
    let mut label = String::new();
    let mut chars = quoted.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '\'' {
            label.push(c);
            continue;
        }
        if chars.peek().map(|&(_, c)| c) == Some('\'') {
            label.push('\'');
            chars.next();
            continue;
        }
        let rest = quoted[i + 1..].strip_prefix('=')?;
        return (!label.is_empty()).then_some((label, rest));
    }
    None
}

/// Splits `12.5MB` into the number and its unit; `U` (undetermined) and
/// anything that is not a number followed by a plain unit give `None`.
fn split_value(field: &str) -> Option<(f64, &str)> {
    let end = number_end(field);
    let value = parse_number(&field[..end])?;
    let unit = &field[end..];
    unit.chars()
        .all(|c| c.is_alphabetic() || c == '%' || c == '/')
        .then_some((value, unit))
}

/// Parses the number at the start of a min or max field, ignoring a unit
/// that some plugins repeat there.
fn leading_number(field: &str) -> Option<f64> {
    parse_number(&field[..number_end(field)])
}

/// Parses a finite number; a decimal comma (from localised plugins) counts
/// as a point.
fn parse_number(text: &str) -> Option<f64> {
    let value: f64 = text.replace(',', ".").parse().ok()?;
    value.is_finite().then_some(value)
}

/// Byte length of the number at the start of `s`: sign, digits, decimal
/// separators, and an exponent only when digits follow it (so that a unit
/// starting with `e` is not eaten).
fn number_end(s: &str) -> usize {
    let b = s.as_bytes();
    let mut i = 0;
    if matches!(b.first(), Some(b'-' | b'+')) {
        i += 1;
    }
    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b',') {
        i += 1;
    }
    if i < b.len() && matches!(b[i], b'e' | b'E') {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'-' | b'+')) {
            j += 1;
        }
        if b.get(j).is_some_and(u8::is_ascii_digit) {
            i = j;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(name: &str, value: f64, unit: &str) -> Metric {
        Metric {
            name: name.into(),
            value,
            unit: unit.into(),
            warn: None,
            crit: None,
            min: None,
            max: None,
        }
    }

    #[test]
    fn check_disk() {
        let p =
            parse("DISK OK - free space: / 3326 MB (56% inode=99%);| /=2643MB;5948;5958;0;5968\n");
        assert_eq!(
            p.summary,
            "DISK OK - free space: / 3326 MB (56% inode=99%);"
        );
        assert_eq!(p.long_output, "");
        assert_eq!(
            p.metrics,
            vec![Metric {
                warn: Some("5948".into()),
                crit: Some("5958".into()),
                min: Some(0.0),
                max: Some(5968.0),
                ..metric("/", 2643.0, "MB")
            }]
        );
    }

    #[test]
    fn check_load() {
        let p = parse(
            "OK - load average: 0.05, 0.10, 0.08|load1=0.050;5.000;10.000;0; \
             load5=0.100;4.000;6.000;0; load15=0.080;3.000;4.000;0;",
        );
        assert_eq!(p.summary, "OK - load average: 0.05, 0.10, 0.08");
        let names: Vec<_> = p.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["load1", "load5", "load15"]);
        assert_eq!(
            p.metrics[2],
            Metric {
                warn: Some("3.000".into()),
                crit: Some("4.000".into()),
                min: Some(0.0),
                ..metric("load15", 0.08, "")
            }
        );
    }

    #[test]
    fn check_http() {
        let p = parse(
            "HTTP OK: HTTP/1.1 200 OK - 612 bytes in 0.001 second response time \
             |time=0.000563s;;;0.000000;10.000000 size=612B;;;0",
        );
        assert_eq!(
            p.summary,
            "HTTP OK: HTTP/1.1 200 OK - 612 bytes in 0.001 second response time"
        );
        assert_eq!(
            p.metrics,
            vec![
                Metric {
                    min: Some(0.0),
                    max: Some(10.0),
                    ..metric("time", 0.000563, "s")
                },
                Metric {
                    min: Some(0.0),
                    ..metric("size", 612.0, "B")
                },
            ]
        );
    }

    #[test]
    fn multi_line_output() {
        let out = "DISK OK - free space: / 3326 MB (56%); | /=2643MB;5948;5958;0;5968\n\
                   / 15272 MB (77%);\n\
                   /boot 68 MB (69%);\n\
                   /home 69357 MB (27%);\n\
                   /var/log 819 MB (84%); | /boot=68MB;88;93;0;98\n\
                   /home=69357MB;253404;253409;0;253414\n\
                   /var/log=818MB;970;975;0;980\n";
        let p = parse(out);
        assert_eq!(p.summary, "DISK OK - free space: / 3326 MB (56%);");
        assert_eq!(
            p.long_output,
            "/ 15272 MB (77%);\n/boot 68 MB (69%);\n/home 69357 MB (27%);\n/var/log 819 MB (84%);"
        );
        let names: Vec<_> = p.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["/", "/boot", "/home", "/var/log"]);
        assert_eq!(p.metrics[3].value, 818.0);
    }

    #[test]
    fn long_output_without_perfdata() {
        let p = parse("WARNING: two of three\nfirst ok\nsecond bad\n");
        assert_eq!(p.summary, "WARNING: two of three");
        assert_eq!(p.long_output, "first ok\nsecond bad");
        assert!(p.metrics.is_empty());
    }

    #[test]
    fn quoted_labels_ranges_and_units() {
        let p = parse(
            "OK | 'C:\\ Label'=10%;@10:20;~:30 'it''s'=1c;10:;;; 'odd=name'=3us \
             rx=5KB;;;0;1TB x=U;1;2 neg=-1.5e-3ms;;;-2;2",
        );
        assert_eq!(p.metrics.len(), 5, "{:?}", p.metrics);
        assert_eq!(
            p.metrics[0],
            Metric {
                warn: Some("@10:20".into()),
                crit: Some("~:30".into()),
                ..metric("C:\\ Label", 10.0, "%")
            }
        );
        assert_eq!(
            p.metrics[1],
            Metric {
                warn: Some("10:".into()),
                ..metric("it's", 1.0, "c")
            }
        );
        assert_eq!(p.metrics[2], metric("odd=name", 3.0, "us"));
        assert_eq!(p.metrics[3].max, Some(1.0), "unit after max is ignored");
        assert_eq!(p.metrics[4].value, -0.0015);
        assert_eq!(p.metrics[4].unit, "ms");
        assert_eq!(p.metrics[4].min, Some(-2.0));
    }

    #[test]
    fn malformed_items_are_skipped() {
        let p = parse("OK | =1 a= b=x c=1;2 d=1..2 e==3 f=1 2 g=inf h=NaN ''=4 i=5kB");
        let names: Vec<_> = p.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["c", "f", "i"], "{:?}", p.metrics);
        // An unterminated quoted label swallows the rest of the line.
        let p = parse("OK | 'open=1 d=2");
        assert!(p.metrics.is_empty(), "{:?}", p.metrics);
    }

    #[test]
    fn odd_inputs_never_panic() {
        let pieces = [
            "", "|", "||", "'", "''", "'''", "=", ";", ";;;;;;", "\n", "\r\n", " ", "é", "💥", "1",
            "-", "+", "e", "1e", "1e+", ".", ",", "U", "a=1", "'a b'=2", "%", "\0", "\t", "@", "~",
            ":",
        ];
        // Every ordered triple of pieces, and each piece repeated.
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let input = format!("{a}{b}{c}");
                    let p = parse(&input);
                    assert!(p.metrics.iter().all(|m| m.value.is_finite()), "{input:?}");
                }
            }
            parse(&a.repeat(1000));
        }
        // A deterministic pseudo-random byte soup over the interesting bytes.
        let alphabet = b"ab01.-e'=;|% \nU:@~,";
        let mut state: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let input: String = (0..40)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    alphabet[state as usize % alphabet.len()] as char
                })
                .collect();
            parse(&input);
        }
    }
}
