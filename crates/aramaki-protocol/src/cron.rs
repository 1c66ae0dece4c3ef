//! Five-field cron expressions: `minute hour day-of-month month day-of-week`.
//!
//! The dialect is Vixie cron's, which is what people type from memory: `*`,
//! numbers, ranges `a-b`, steps `*/n`, `a-b/n` and `a/n` (from `a` to the
//! field's end), lists `a,b`, month names `JAN`–`DEC`, weekday names
//! `SUN`–`SAT` (both case-insensitive), `7` as another Sunday, and the macros
//! `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight` and
//! `@hourly`.
//!
//! Day-of-month and day-of-week combine as in Vixie cron: when both fields are
//! restricted, a day matches if *either* matches (`0 0 13 * FRI` runs on every
//! 13th and on every Friday). A field counts as unrestricted when it starts
//! with `*`, so `*/2` in one of them makes the two combine with AND, exactly
//! like Vixie cron does.
//!
//! Quartz extensions (a seconds field, `?`, `L`, `W`, `#`) are refused with a
//! message that says so, rather than half-supported: a check that silently
//! runs at the wrong time is worse than one that does not load.
//!
//! This module only parses and matches; walking the calendar (time zones,
//! DST) is the agent's business, since it needs a date library.

use std::fmt;

/// A parsed cron expression: one bitset per field.
///
/// Two expressions that select the same times compare equal (`@daily` equals
/// `0 0 * * *`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cron {
    /// Bits 0–59.
    minutes: u64,
    /// Bits 0–23.
    hours: u32,
    /// Bits 1–31.
    days: u32,
    /// Bits 1–12.
    months: u16,
    /// Bits 0–6, Sunday is 0.
    weekdays: u8,
    /// The day-of-month field starts with `*` (Vixie's `DOM_STAR`).
    days_star: bool,
    /// The day-of-week field starts with `*` (Vixie's `DOW_STAR`).
    weekdays_star: bool,
}

/// One of the five fields, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl Field {
    /// Position in the expression, counting from 1 as people do.
    pub fn position(self) -> usize {
        match self {
            Field::Minute => 1,
            Field::Hour => 2,
            Field::DayOfMonth => 3,
            Field::Month => 4,
            Field::DayOfWeek => 5,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Field::Minute => "minute",
            Field::Hour => "hour",
            Field::DayOfMonth => "day-of-month",
            Field::Month => "month",
            Field::DayOfWeek => "day-of-week",
        }
    }

    /// Smallest and largest value a user may write (day-of-week allows 7).
    fn bounds(self) -> (u8, u8) {
        match self {
            Field::Minute => (0, 59),
            Field::Hour => (0, 23),
            Field::DayOfMonth => (1, 31),
            Field::Month => (1, 12),
            Field::DayOfWeek => (0, 7),
        }
    }

    /// Names accepted in place of numbers; index + `first` is the value.
    fn names(self) -> Option<(&'static [&'static str], u8)> {
        const MONTHS: [&str; 12] = [
            "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
        ];
        const WEEKDAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];
        match self {
            Field::Month => Some((&MONTHS, 1)),
            Field::DayOfWeek => Some((&WEEKDAYS, 0)),
            _ => None,
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.position(), self.name())
    }
}

/// Why a cron expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("cron expression is empty")]
    Empty,
    #[error("cron expression needs 5 fields, got {got}{}", field_count_hint(*got))]
    FieldCount { got: usize },
    #[error(
        "unknown cron macro '{0}', expected one of @yearly, @annually, @monthly, \
         @weekly, @daily, @midnight, @hourly"
    )]
    UnknownMacro(String),
    /// `part` is the piece of the field at fault, not the whole field.
    #[error("cron field {field} '{part}' {problem}")]
    Field {
        field: Field,
        part: String,
        problem: Problem,
    },
}

fn field_count_hint(got: usize) -> &'static str {
    if got == 6 {
        " (a seconds field is not supported)"
    } else {
        ""
    }
}

/// What is wrong with a piece of a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("is out of range {min}-{max}")]
    OutOfRange { min: u8, max: u8 },
    #[error("is not a number")]
    NotANumber,
    #[error("is neither a number nor a name ({0})")]
    NotANumberOrName(&'static str),
    #[error("is empty")]
    Empty,
    #[error("has a step of 0")]
    ZeroStep,
    #[error("is a range whose start is after its end (ranges do not wrap around)")]
    Backwards,
    #[error("uses '{0}', a Quartz extension that is not supported")]
    Quartz(char),
}

impl Cron {
    /// Parses a five-field expression or a macro.
    pub fn parse(expr: &str) -> Result<Cron, CronError> {
        let expr = expr.trim();
        if expr.is_empty() {
            return Err(CronError::Empty);
        }
        let expanded = if expr.starts_with('@') {
            expand_macro(expr)?
        } else {
            expr
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, day, month, weekday] = fields[..] else {
            return Err(CronError::FieldCount { got: fields.len() });
        };
        // In order, so that the first bad field is the one reported.
        let minutes = parse_field(Field::Minute, minute)?;
        let hours = parse_field(Field::Hour, hour)?;
        let days = parse_field(Field::DayOfMonth, day)?;
        let months = parse_field(Field::Month, month)?;
        let weekdays = parse_field(Field::DayOfWeek, weekday)?;
        Ok(Cron {
            minutes,
            hours: narrow(hours),
            days: narrow(days),
            months: narrow(months),
            // Bit 7 is the second Sunday.
            weekdays: narrow((weekdays | weekdays >> 7) & 0x7f),
            days_star: day.starts_with('*'),
            weekdays_star: weekday.starts_with('*'),
        })
    }

    /// Whether the expression selects this minute. `weekday` counts from
    /// Sunday = 0 (7 is accepted as Sunday too); values out of range never
    /// match.
    pub fn matches(&self, minute: u8, hour: u8, day: u8, month: u8, weekday: u8) -> bool {
        self.minute_matches(minute)
            && self.hour_matches(hour)
            && self.month_matches(month)
            && self.day_matches(day, weekday)
    }

    pub fn minute_matches(&self, minute: u8) -> bool {
        bit(self.minutes, minute)
    }

    pub fn hour_matches(&self, hour: u8) -> bool {
        bit(u64::from(self.hours), hour)
    }

    pub fn month_matches(&self, month: u8) -> bool {
        bit(u64::from(self.months), month)
    }

    /// Day-of-month and day-of-week together, with Vixie's OR rule.
    pub fn day_matches(&self, day: u8, weekday: u8) -> bool {
        let weekday = if weekday == 7 { 0 } else { weekday };
        let by_day = bit(u64::from(self.days), day);
        let by_weekday = weekday < 7 && bit(u64::from(self.weekdays), weekday);
        if self.days_star || self.weekdays_star {
            by_day && by_weekday
        } else {
            by_day || by_weekday
        }
    }

    /// The first selected minute at or after `from` in an hour, if any: lets a
    /// scheduler jump instead of trying every minute.
    pub fn next_minute(&self, from: u8) -> Option<u8> {
        next_bit(self.minutes, from)
    }

    /// The first selected hour at or after `from` in a day, if any.
    pub fn next_hour(&self, from: u8) -> Option<u8> {
        next_bit(u64::from(self.hours), from)
    }
}

impl std::str::FromStr for Cron {
    type Err = CronError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Cron::parse(s)
    }
}

fn expand_macro(expr: &str) -> Result<&'static str, CronError> {
    Ok(match expr.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => return Err(CronError::UnknownMacro(expr.to_owned())),
    })
}

/// Parses a comma-separated list into a bitset over the field's values.
fn parse_field(field: Field, text: &str) -> Result<u64, CronError> {
    text.split(',')
        .try_fold(0u64, |bits, item| Ok(bits | parse_item(field, item)?))
}

/// One list item: `*`, `v`, `a-b`, each optionally followed by `/step`.
fn parse_item(field: Field, item: &str) -> Result<u64, CronError> {
    let fail = |problem| CronError::Field {
        field,
        part: item.to_owned(),
        problem,
    };
    if item.is_empty() {
        return Err(fail(Problem::Empty));
    }
    if let Some(c) = quartz_char(item) {
        return Err(fail(Problem::Quartz(c)));
    }
    let (range, step) = match item.split_once('/') {
        Some((range, step)) => (range, Some(parse_step(field, step)?)),
        None => (item, None),
    };
    let (min, max) = field.bounds();
    let (start, end) = if range == "*" {
        (min, max)
    } else if let Some((a, b)) = range.split_once('-') {
        let (a, b) = (parse_value(field, a)?, parse_value(field, b)?);
        if a > b {
            return Err(fail(Problem::Backwards));
        }
        (a, b)
    } else {
        let a = parse_value(field, range)?;
        // `a/n` runs from a to the end of the field; a plain `a` is just a.
        (a, if step.is_some() { max } else { a })
    };
    let step = usize::from(step.unwrap_or(1));
    Ok((start..=end)
        .step_by(step)
        .fold(0u64, |bits, v| bits | 1 << v))
}

/// The Quartz extension an item uses, if any: `?` and `#` anywhere, and
/// `L`, `W` or `LW` next to digits (`L`, `15W`, `5L`, `L-3`), which no month
/// or weekday name looks like.
fn quartz_char(item: &str) -> Option<char> {
    if let Some(c) = item.chars().find(|c| matches!(c, '?' | '#')) {
        return Some(c);
    }
    item.split(['-', '/']).find_map(|word| {
        let letters: String = word
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .map(|c| c.to_ascii_uppercase())
            .collect();
        match letters.as_str() {
            "L" | "LW" => Some('L'),
            "W" => Some('W'),
            _ => None,
        }
    })
}

fn parse_step(field: Field, text: &str) -> Result<u8, CronError> {
    let fail = |problem| CronError::Field {
        field,
        part: text.to_owned(),
        problem,
    };
    match parse_number(text) {
        Some(0) => Err(fail(Problem::ZeroStep)),
        Some(n) => Ok(u8::try_from(n).unwrap_or(u8::MAX)),
        None if text.is_empty() => Err(fail(Problem::Empty)),
        None => Err(fail(Problem::NotANumber)),
    }
}

/// A number or (in month and day-of-week) a name, checked against the
/// field's bounds.
fn parse_value(field: Field, text: &str) -> Result<u8, CronError> {
    let fail = |problem| CronError::Field {
        field,
        part: text.to_owned(),
        problem,
    };
    let (min, max) = field.bounds();
    if let Some(n) = parse_number(text) {
        return match u8::try_from(n) {
            Ok(v) if (min..=max).contains(&v) => Ok(v),
            _ => Err(fail(Problem::OutOfRange { min, max })),
        };
    }
    if text.is_empty() {
        return Err(fail(Problem::Empty));
    }
    match field.names() {
        Some((names, first)) => names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(text))
            .and_then(|i| u8::try_from(i).ok())
            .map(|i| i + first)
            .ok_or_else(|| {
                let hint = if field == Field::Month {
                    "JAN-DEC"
                } else {
                    "SUN-SAT"
                };
                fail(Problem::NotANumberOrName(hint))
            }),
        None => Err(fail(Problem::NotANumber)),
    }
}

/// Plain decimal digits only (`str::parse` would also take `+5`); numbers
/// too long for `u32` saturate so that they are reported as out of range.
fn parse_number(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u32::MAX))
}

fn bit(bits: u64, value: u8) -> bool {
    value < 64 && bits & (1 << value) != 0
}

fn next_bit(bits: u64, from: u8) -> Option<u8> {
    if from >= 64 {
        return None;
    }
    let rest = bits >> from;
    (rest != 0).then(|| from + rest.trailing_zeros() as u8)
}

/// Narrows a bitset to the field's storage; the parser never sets bits
/// beyond the field's bounds, so nothing is lost.
fn narrow<T: TryFrom<u64> + Default>(bits: u64) -> T {
    T::try_from(bits).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(expr: &str) -> Cron {
        Cron::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"))
    }

    fn err(expr: &str) -> String {
        Cron::parse(expr).unwrap_err().to_string()
    }

    #[test]
    fn every_minute() {
        let c = cron("* * * * *");
        assert!(c.matches(0, 0, 1, 1, 0));
        assert!(c.matches(59, 23, 31, 12, 6));
    }

    #[test]
    fn numbers_ranges_steps_and_lists() {
        let c = cron("5,10-12,*/20 0-6/3 1 1 *");
        for m in [0, 5, 10, 11, 12, 20, 40] {
            assert!(c.minute_matches(m), "minute {m}");
        }
        for m in [1, 9, 13, 21, 59] {
            assert!(!c.minute_matches(m), "minute {m}");
        }
        for h in [0, 3, 6] {
            assert!(c.hour_matches(h));
        }
        assert!(!c.hour_matches(9));
        let c = cron("10/15 * * * *");
        let got: Vec<u8> = (0..60).filter(|&m| c.minute_matches(m)).collect();
        assert_eq!(got, vec![10, 25, 40, 55]);
    }

    #[test]
    fn names_are_case_insensitive() {
        let c = cron("0 9 * jan-Mar,DEC mon-FRI");
        assert!(c.month_matches(1) && c.month_matches(3) && c.month_matches(12));
        assert!(!c.month_matches(4));
        assert!(c.day_matches(15, 1) && c.day_matches(15, 5));
        assert!(!c.day_matches(15, 0) && !c.day_matches(15, 6));
        assert_eq!(cron("0 0 * JUL WED"), cron("0 0 * 7 3"));
    }

    #[test]
    fn seven_is_sunday() {
        assert_eq!(cron("0 0 * * 7"), cron("0 0 * * 0"));
        let c = cron("0 0 * * 5-7");
        for w in [5, 6, 0] {
            assert!(c.day_matches(1, w), "weekday {w}");
        }
        assert!(!c.day_matches(1, 1));
        assert!(c.day_matches(1, 7), "7 as input is Sunday too");
    }

    #[test]
    fn macros_expand() {
        assert_eq!(cron("@yearly"), cron("0 0 1 1 *"));
        assert_eq!(cron("@annually"), cron("0 0 1 1 *"));
        assert_eq!(cron("@monthly"), cron("0 0 1 * *"));
        assert_eq!(cron("@weekly"), cron("0 0 * * 0"));
        assert_eq!(cron("@DAILY"), cron("0 0 * * *"));
        assert_eq!(cron("@midnight"), cron("0 0 * * *"));
        assert_eq!(cron("@hourly"), cron("0 * * * *"));
        assert!(err("@reboot").contains("unknown cron macro '@reboot'"));
    }

    #[test]
    fn day_fields_combine_like_vixie() {
        // Both restricted: either one.
        let c = cron("0 0 13 * FRI");
        assert!(c.day_matches(13, 2), "the 13th, a Tuesday");
        assert!(c.day_matches(6, 5), "a Friday, the 6th");
        assert!(!c.day_matches(6, 2));
        // One is `*`: the other alone decides.
        let c = cron("0 0 13 * *");
        assert!(c.day_matches(13, 2) && !c.day_matches(6, 5));
        let c = cron("0 0 * * FRI");
        assert!(!c.day_matches(13, 2) && c.day_matches(6, 5));
        // A field starting with `*` counts as unrestricted: both must match.
        let c = cron("0 0 */2 * MON");
        assert!(c.day_matches(3, 1));
        assert!(!c.day_matches(3, 2) && !c.day_matches(4, 1));
    }

    #[test]
    fn errors_name_the_field_and_problem() {
        assert_eq!(
            err("0 25 * * *"),
            "cron field 2 (hour) '25' is out of range 0-23"
        );
        assert_eq!(err("* * * *"), "cron expression needs 5 fields, got 4");
        assert_eq!(
            err("0 * * * * *"),
            "cron expression needs 5 fields, got 6 (a seconds field is not supported)"
        );
        assert_eq!(err(""), "cron expression is empty");
        assert_eq!(
            err("0 0 0 * *"),
            "cron field 3 (day-of-month) '0' is out of range 1-31"
        );
        assert_eq!(
            err("*/0 * * * *"),
            "cron field 1 (minute) '0' has a step of 0"
        );
        assert_eq!(
            err("0 0 * * FRI-MON"),
            "cron field 5 (day-of-week) 'FRI-MON' is a range whose start is after its end \
             (ranges do not wrap around)"
        );
        assert_eq!(
            err("0 0 * FOO *"),
            "cron field 4 (month) 'FOO' is neither a number nor a name (JAN-DEC)"
        );
        assert_eq!(
            err("x 0 * * *"),
            "cron field 1 (minute) 'x' is not a number"
        );
        assert_eq!(err("1,,2 0 * * *"), "cron field 1 (minute) '' is empty");
        assert_eq!(
            err("0 0 99999999999 * *"),
            "cron field 3 (day-of-month) '99999999999' is out of range 1-31"
        );
        assert!(err("+5 * * * *").contains("not a number"));
        assert!(
            err("JAN * * * *").contains("not a number"),
            "names only in their fields"
        );
    }

    #[test]
    fn quartz_syntax_is_refused_clearly() {
        for (expr, c) in [
            ("0 0 ? * MON", '?'),
            ("0 0 L * *", 'L'),
            ("0 0 15W * *", 'W'),
            ("0 0 * * 5#3", '#'),
            ("0 0 * * 5L", 'L'),
        ] {
            let e = err(expr);
            assert!(
                e.contains(&format!("uses '{c}', a Quartz extension")),
                "{expr}: {e}"
            );
        }
        // Names that contain those letters still work.
        assert!(Cron::parse("0 0 * JUL,APR WED").is_ok());
    }

    #[test]
    fn next_helpers_jump() {
        let c = cron("15,45 9-17 * * *");
        assert_eq!(c.next_minute(0), Some(15));
        assert_eq!(c.next_minute(16), Some(45));
        assert_eq!(c.next_minute(46), None);
        assert_eq!(c.next_hour(0), Some(9));
        assert_eq!(c.next_hour(17), Some(17));
        assert_eq!(c.next_hour(18), None);
        assert_eq!(c.next_minute(200), None);
    }

    #[test]
    fn out_of_range_inputs_never_match() {
        let c = cron("* * * * *");
        assert!(!c.matches(60, 0, 1, 1, 0));
        assert!(!c.matches(0, 24, 1, 1, 0));
        assert!(!c.matches(0, 0, 0, 1, 0));
        assert!(!c.matches(0, 0, 32, 1, 0));
        assert!(!c.matches(0, 0, 1, 13, 0));
        assert!(!c.matches(0, 0, 1, 1, 8));
        assert!(!c.matches(255, 255, 255, 255, 255));
    }

    /// Tiny deterministic generator, so that the property test needs no crate.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() as usize) % items.len()]
        }
    }

    /// Builds a field from pieces that every field takes, with the odd
    /// piece that probes the error paths.
    fn random_field(rng: &mut Lcg) -> String {
        const GOOD: &[&str] = &["*", "1", "2", "3", "5", "7", "01"];
        const ODD: &[&str] = &[
            "0",
            "12",
            "23",
            "31",
            "59",
            "60",
            "99",
            "MON",
            "sun",
            "Jan",
            "dec",
            "L",
            "?",
            "W",
            "#",
            "",
            "x",
            "4294967296",
            "-",
            "/",
            ",",
        ];
        let atom = |rng: &mut Lcg| {
            if rng.next() % 12 == 0 {
                rng.pick(ODD)
            } else {
                rng.pick(GOOD)
            }
        };
        let items: Vec<String> = (0..=(rng.next() % 3))
            .map(|_| {
                let first = atom(rng);
                match rng.next() % 6 {
                    0 => format!("{first}-{}", atom(rng)),
                    1 => format!("{first}/{}", atom(rng)),
                    2 => format!("{first}-{}/{}", atom(rng), atom(rng)),
                    _ => first.to_owned(),
                }
            })
            .collect();
        items.join(",")
    }

    #[test]
    fn random_expressions_never_panic_and_agree_with_matches() {
        let mut rng = Lcg(0x5eed);
        let mut parsed = 0;
        for _ in 0..20_000 {
            let fields = if rng.next() % 4 == 0 {
                3 + rng.next() % 4
            } else {
                5
            };
            let expr: Vec<String> = (0..fields).map(|_| random_field(&mut rng)).collect();
            let expr = expr.join(" ");
            let Ok(c) = Cron::parse(&expr) else {
                continue;
            };
            parsed += 1;
            for _ in 0..8 {
                let (m, h, d, mo, w) = (
                    (rng.next() % 70) as u8,
                    (rng.next() % 30) as u8,
                    (rng.next() % 35) as u8,
                    (rng.next() % 15) as u8,
                    (rng.next() % 9) as u8,
                );
                let all = c.minute_matches(m)
                    && c.hour_matches(h)
                    && c.month_matches(mo)
                    && c.day_matches(d, w);
                assert_eq!(c.matches(m, h, d, mo, w), all, "{expr}");
                if let Some(next) = c.next_minute(m) {
                    assert!(next >= m && c.minute_matches(next), "{expr}");
                }
            }
        }
        assert!(
            parsed > 100,
            "the generator should produce valid ones too: {parsed}"
        );
        for f in [
            Field::Minute,
            Field::Hour,
            Field::DayOfMonth,
            Field::Month,
            Field::DayOfWeek,
        ] {
            assert!(f.bounds().0 <= f.bounds().1);
        }
    }
}
