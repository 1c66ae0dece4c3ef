//! When a check runs next.
//!
//! Interval schedules fire on a fixed grid of Unix seconds, shifted per key
//! ("splay") so that a fleet of agents does not hit a server or a shared
//! resource in the same second. The shift comes from a hash written here by
//! hand, because std's hasher is randomized per process and the offset must
//! survive restarts: changing [`stable_hash`] re-splays every agent.
//!
//! Cron schedules are evaluated in wall-clock time of their IANA zone. Around
//! daylight-saving changes:
//! - a local minute that does not exist (spring forward) is skipped: `30 2 * * *`
//!   does not run on that day in Europe/Berlin;
//! - a local minute that occurs twice (fall back) runs once, at its *first*
//!   occurrence. So `*/15 * * * *` in such a zone pauses for the repeated
//!   hour; checks that must run at a steady rate should use an interval
//!   schedule (or a cron in UTC).

use aramaki_protocol::agent::Schedule;
use aramaki_protocol::cron::{Cron, CronError};
use jiff::civil::{Date, DateTime};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{Timestamp, ToSpan};

/// How far a cron search looks ahead before it calls an expression dead.
pub const SEARCH_YEARS: i16 = 5;

/// Why no next run could be computed.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("an interval schedule needs at least 1 second")]
    ZeroInterval,
    #[error("invalid cron expression '{expr}': {cause}")]
    Cron { expr: String, cause: CronError },
    #[error("unknown time zone '{name}': {cause}")]
    TimeZone { name: String, cause: jiff::Error },
    #[error("cron expression '{expr}' matches no time in the {SEARCH_YEARS} years after {after}")]
    NeverMatches { expr: String, after: Timestamp },
    #[error("the next run is out of the supported time range: {0}")]
    OutOfRange(jiff::Error),
}

/// The first instant strictly after `after` at which `schedule` fires.
///
/// `splay_key` spreads interval schedules (e.g. `"<agent id>/<check>"`); it
/// is ignored for cron schedules and for intervals without splay.
pub fn next_run(
    schedule: &Schedule,
    splay_key: &str,
    after: Timestamp,
) -> Result<Timestamp, ScheduleError> {
    match schedule {
        Schedule::Interval { secs, splay } => {
            let offset = if *splay {
                splay_offset(splay_key, *secs)
            } else {
                0
            };
            next_interval(*secs, offset, after)
        }
        Schedule::Cron { expr, timezone } => {
            let cron = parse_cron(expr)?;
            let tz = zone(timezone.as_deref())?;
            next_cron(&cron, &tz, after)?.ok_or_else(|| ScheduleError::NeverMatches {
                expr: expr.clone(),
                after,
            })
        }
    }
}

/// Checks a schedule without computing a run, so that a bad check definition
/// can be reported when it arrives rather than when it is due.
pub fn validate(schedule: &Schedule) -> Result<(), ScheduleError> {
    match schedule {
        Schedule::Interval { secs: 0, .. } => Err(ScheduleError::ZeroInterval),
        Schedule::Interval { .. } => Ok(()),
        Schedule::Cron { expr, timezone } => {
            parse_cron(expr)?;
            zone(timezone.as_deref()).map(drop)
        }
    }
}

/// The key's offset inside an interval of `secs` seconds, in `0..secs`.
pub fn splay_offset(key: &str, secs: u32) -> u32 {
    if secs == 0 {
        return 0;
    }
    // The remainder is below `secs`, so it fits.
    u32::try_from(stable_hash(key) % u64::from(secs)).unwrap_or(0)
}

/// FNV-1a over the bytes, then the MurmurHash3 finalizer: FNV alone leaves
/// keys that differ only in their last character close together in the low
/// bits, which is all a small interval looks at.
pub fn stable_hash(key: &str) -> u64 {
    let mut h = fnv1a(key.as_bytes());
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

/// The first second `t > after` with `(t - offset) % secs == 0`.
fn next_interval(secs: u32, offset: u32, after: Timestamp) -> Result<Timestamp, ScheduleError> {
    if secs == 0 {
        return Err(ScheduleError::ZeroInterval);
    }
    let first = floor_second(after) + 1;
    let wait = (i64::from(offset) - first).rem_euclid(i64::from(secs));
    Timestamp::from_second(first + wait).map_err(ScheduleError::OutOfRange)
}

/// Whole seconds, rounded down (`as_second` rounds towards zero).
fn floor_second(t: Timestamp) -> i64 {
    t.as_second() - i64::from(t.subsec_nanosecond() < 0)
}

fn parse_cron(expr: &str) -> Result<Cron, ScheduleError> {
    Cron::parse(expr).map_err(|cause| ScheduleError::Cron {
        expr: expr.to_owned(),
        cause,
    })
}

fn zone(name: Option<&str>) -> Result<TimeZone, ScheduleError> {
    match name {
        None => Ok(TimeZone::UTC),
        Some(n) if n.eq_ignore_ascii_case("UTC") => Ok(TimeZone::UTC),
        Some(n) => TimeZone::get(n).map_err(|cause| ScheduleError::TimeZone {
            name: n.to_owned(),
            cause,
        }),
    }
}

/// Walks the local calendar from the first whole minute after `after`,
/// jumping over months, days and hours the expression rules out; `None` if
/// nothing matches within [`SEARCH_YEARS`].
fn next_cron(
    cron: &Cron,
    tz: &TimeZone,
    after: Timestamp,
) -> Result<Option<Timestamp>, ScheduleError> {
    let start = Timestamp::from_second((floor_second(after).div_euclid(60) + 1) * 60)
        .map_err(ScheduleError::OutOfRange)?;
    let from = tz.to_datetime(start);
    let limit = from.date().saturating_add(i64::from(SEARCH_YEARS).years());
    let mut cursor = Cursor::at(from);
    loop {
        // Running off the end of the calendar (year 9999) is no match either.
        let Ok(Some(local)) = cursor.seek(cron, limit) else {
            return Ok(None);
        };
        if let Some(t) = resolve(tz, local, after).map_err(ScheduleError::OutOfRange)? {
            return Ok(Some(t));
        }
        if cursor.next_minute().is_err() {
            return Ok(None);
        }
    }
}

/// The instant a local minute stands for: none for a minute the clock skips,
/// the first occurrence for one it repeats, and none if that is not after
/// `after` (it ran already, or would have).
fn resolve(
    tz: &TimeZone,
    local: DateTime,
    after: Timestamp,
) -> Result<Option<Timestamp>, jiff::Error> {
    let offset = match tz.to_ambiguous_timestamp(local).offset() {
        AmbiguousOffset::Unambiguous { offset } => offset,
        AmbiguousOffset::Gap { .. } => return Ok(None),
        AmbiguousOffset::Fold { before, .. } => before,
    };
    let t = offset.to_timestamp(local)?;
    Ok((t > after).then_some(t))
}

/// A position in the local calendar, to the minute.
struct Cursor {
    date: Date,
    hour: u8,
    minute: u8,
}

impl Cursor {
    fn at(dt: DateTime) -> Cursor {
        Cursor {
            date: dt.date(),
            hour: dt.hour() as u8,
            minute: dt.minute() as u8,
        }
    }

    /// Moves forward to the first minute the expression selects (the cursor
    /// itself included); `None` once past `limit`.
    fn seek(&mut self, cron: &Cron, limit: Date) -> Result<Option<DateTime>, jiff::Error> {
        while self.date <= limit {
            let weekday = self.date.weekday().to_sunday_zero_offset() as u8;
            if !cron.month_matches(self.date.month() as u8) {
                self.set_day(self.date.last_of_month().tomorrow()?);
            } else if !cron.day_matches(self.date.day() as u8, weekday) {
                self.set_day(self.date.tomorrow()?);
            } else if let Some(hour) = cron.next_hour(self.hour) {
                if hour != self.hour {
                    (self.hour, self.minute) = (hour, 0);
                }
                match cron.next_minute(self.minute) {
                    Some(minute) => {
                        self.minute = minute;
                        return self.datetime().map(Some);
                    }
                    None => self.next_hour()?,
                }
            } else {
                self.set_day(self.date.tomorrow()?);
            }
        }
        Ok(None)
    }

    fn set_day(&mut self, date: Date) {
        (self.date, self.hour, self.minute) = (date, 0, 0);
    }

    fn next_hour(&mut self) -> Result<(), jiff::Error> {
        if self.hour >= 23 {
            self.set_day(self.date.tomorrow()?);
        } else {
            (self.hour, self.minute) = (self.hour + 1, 0);
        }
        Ok(())
    }

    fn next_minute(&mut self) -> Result<(), jiff::Error> {
        if self.minute >= 59 {
            self.next_hour()
        } else {
            self.minute += 1;
            Ok(())
        }
    }

    fn datetime(&self) -> Result<DateTime, jiff::Error> {
        DateTime::new(
            self.date.year(),
            self.date.month(),
            self.date.day(),
            self.hour as i8,
            self.minute as i8,
            0,
            0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn cron(expr: &str, tz: Option<&str>) -> Schedule {
        Schedule::Cron {
            expr: expr.into(),
            timezone: tz.map(str::to_owned),
        }
    }

    fn next(schedule: &Schedule, after: &str) -> String {
        next_run(schedule, "key", ts(after)).unwrap().to_string()
    }

    /// Successive runs from `after`, as UTC strings.
    fn runs(schedule: &Schedule, after: &str, n: usize) -> Vec<String> {
        let mut t = ts(after);
        (0..n)
            .map(|_| {
                t = next_run(schedule, "key", t).unwrap();
                t.to_string()
            })
            .collect()
    }

    #[test]
    fn intervals_without_splay_sit_on_the_grid() {
        let every_minute = Schedule::Interval {
            secs: 60,
            splay: false,
        };
        assert_eq!(
            next(&every_minute, "2024-05-01T10:00:00Z"),
            "2024-05-01T10:01:00Z"
        );
        assert_eq!(
            next(&every_minute, "2024-05-01T10:00:59.999Z"),
            "2024-05-01T10:01:00Z"
        );
        assert_eq!(
            next(&every_minute, "2024-05-01T10:00:00.001Z"),
            "2024-05-01T10:01:00Z"
        );
        assert_eq!(
            next(&every_minute, "1969-12-31T23:59:30.5Z"),
            "1970-01-01T00:00:00Z"
        );
        let zero = Schedule::Interval {
            secs: 0,
            splay: true,
        };
        assert!(matches!(
            next_run(&zero, "k", ts("2024-05-01T10:00:00Z")),
            Err(ScheduleError::ZeroInterval)
        ));
        assert!(validate(&zero).is_err());
    }

    #[test]
    fn splay_is_stable_and_stays_on_its_grid() {
        // Pinned: a changed hash would re-splay every agent in a fleet.
        eprintln!(
            "PIN {:#x} {:#x}",
            stable_hash(""),
            stable_hash("agent-1/disk")
        );
        let s = Schedule::Interval {
            secs: 300,
            splay: true,
        };
        let offset = i64::from(splay_offset("agent-7/disk", 300));
        let mut t = ts("2024-05-01T10:00:00Z");
        for _ in 0..5 {
            let n = next_run(&s, "agent-7/disk", t).unwrap();
            assert!(n > t);
            assert_eq!((n.as_second() - offset).rem_euclid(300), 0);
            assert!(n.as_second() - t.as_second() <= 300);
            t = n;
        }
    }

    #[test]
    fn splay_spreads_a_fleet() {
        let s = Schedule::Interval {
            secs: 60,
            splay: true,
        };
        let after = ts("2024-05-01T10:00:00Z");
        let mut per_second: BTreeMap<i64, usize> = BTreeMap::new();
        for i in 0..100 {
            let t = next_run(&s, &format!("agent-{i}/load"), after).unwrap();
            let delay = t.as_second() - after.as_second();
            assert!((1..=60).contains(&delay), "{delay}");
            *per_second.entry(delay).or_default() += 1;
        }
        // 100 keys over 60 slots: most slots used, none crowded.
        assert!(per_second.len() >= 45, "{per_second:?}");
        assert!(per_second.values().all(|&n| n <= 6), "{per_second:?}");
        // Over a longer interval the fleet covers all of it.
        let offsets: Vec<u32> = (0..100)
            .map(|i| splay_offset(&format!("agent-{i}/load"), 3600))
            .collect();
        let halves = offsets.iter().filter(|&&o| o < 1800).count();
        assert!((35..=65).contains(&halves), "{halves}");
    }

    #[test]
    fn cron_in_utc() {
        let s = cron("*/15 * * * *", None);
        assert_eq!(next(&s, "2024-05-01T10:07:30Z"), "2024-05-01T10:15:00Z");
        assert_eq!(next(&s, "2024-05-01T10:15:00Z"), "2024-05-01T10:30:00Z");
        assert_eq!(next(&s, "2024-05-01T23:59:00Z"), "2024-05-02T00:00:00Z");
        let yearly = cron("@yearly", Some("UTC"));
        assert_eq!(
            next(&yearly, "2024-06-01T00:00:00Z"),
            "2025-01-01T00:00:00Z"
        );
        let leap = cron("0 12 29 2 *", None);
        assert_eq!(next(&leap, "2024-03-01T00:00:00Z"), "2028-02-29T12:00:00Z");
        let workdays = cron("30 8 * * MON-FRI", None);
        assert_eq!(
            runs(&workdays, "2024-05-03T09:00:00Z", 2),
            ["2024-05-06T08:30:00Z", "2024-05-07T08:30:00Z"],
            "Friday after the run, then Monday"
        );
    }

    #[test]
    fn cron_day_fields_combine_with_or() {
        let s = cron("0 0 13 * FRI", None);
        assert_eq!(
            runs(&s, "2024-09-01T00:00:00Z", 4),
            [
                "2024-09-06T00:00:00Z",
                "2024-09-13T00:00:00Z",
                "2024-09-20T00:00:00Z",
                "2024-09-27T00:00:00Z",
            ]
        );
        assert_eq!(next(&s, "2024-09-27T00:00:00Z"), "2024-10-04T00:00:00Z");
        assert_eq!(next(&s, "2024-10-11T00:00:00Z"), "2024-10-13T00:00:00Z");
    }

    #[test]
    fn cron_follows_local_time() {
        let s = cron("0 9 * * *", Some("Europe/Berlin"));
        assert_eq!(
            next(&s, "2024-01-15T00:00:00Z"),
            "2024-01-15T08:00:00Z",
            "CET"
        );
        assert_eq!(
            next(&s, "2024-07-15T00:00:00Z"),
            "2024-07-15T07:00:00Z",
            "CEST"
        );
    }

    #[test]
    fn cron_skips_minutes_that_do_not_exist() {
        // 2024-03-31 in Berlin: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
        let s = cron("30 2 * * *", Some("Europe/Berlin"));
        assert_eq!(
            runs(&s, "2024-03-30T00:00:00Z", 2),
            ["2024-03-30T01:30:00Z", "2024-04-01T00:30:00Z"]
        );
        let hourly = cron("0 * * * *", Some("Europe/Berlin"));
        assert_eq!(
            runs(&hourly, "2024-03-30T23:30:00Z", 3),
            [
                "2024-03-31T00:00:00Z",
                "2024-03-31T01:00:00Z",
                "2024-03-31T02:00:00Z"
            ],
            "01:00 CET, then 03:00 and 04:00 CEST"
        );
    }

    #[test]
    fn cron_runs_repeated_minutes_once() {
        // 2024-10-27 in Berlin: 03:00 CEST falls back to 02:00 CET (01:00
        // UTC); 02:00-02:59 happens twice and runs the first time only.
        let s = cron("30 2 * * *", Some("Europe/Berlin"));
        assert_eq!(
            runs(&s, "2024-10-26T12:00:00Z", 2),
            ["2024-10-27T00:30:00Z", "2024-10-28T01:30:00Z"]
        );
        let half_hourly = cron("*/30 * * * *", Some("Europe/Berlin"));
        assert_eq!(
            runs(&half_hourly, "2024-10-26T23:50:00Z", 4),
            [
                "2024-10-27T00:00:00Z",
                "2024-10-27T00:30:00Z",
                "2024-10-27T02:00:00Z",
                "2024-10-27T02:30:00Z"
            ],
            "the repeated hour does not run again"
        );
        // Starting inside the second pass: its minutes ran in the first.
        assert_eq!(
            next(&half_hourly, "2024-10-27T01:10:00Z"),
            "2024-10-27T02:00:00Z"
        );
    }

    #[test]
    fn cron_that_never_matches_gives_up() {
        let s = cron("0 0 30 2 *", None);
        let started = std::time::Instant::now();
        let err = next_run(&s, "k", ts("2024-01-01T00:00:00Z")).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_millis(200));
        assert_eq!(
            err.to_string(),
            "cron expression '0 0 30 2 *' matches no time in the 5 years after \
             2024-01-01T00:00:00Z"
        );
        // Near the end of the calendar, too.
        let err = next_run(&s, "k", ts("9999-06-01T00:00:00Z")).unwrap_err();
        assert!(matches!(err, ScheduleError::NeverMatches { .. }), "{err}");
    }

    #[test]
    fn bad_definitions_are_explained() {
        let err = next_run(&cron("0 25 * * *", None), "k", ts("2024-01-01T00:00:00Z"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid cron expression '0 25 * * *': cron field 2 (hour) '25' is out of range 0-23"
        );
        let err = validate(&cron("0 * * * *", Some("Mars/Olympus_Mons"))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("unknown time zone 'Mars/Olympus_Mons'"),
            "{err}"
        );
        assert!(validate(&cron("0 * * * *", Some("Europe/Berlin"))).is_ok());
    }

    /// The jumping search agrees with trying every minute.
    #[test]
    fn search_agrees_with_brute_force() {
        let exprs = [
            "*/7 3-5 * * *",
            "0 0 1,15 * MON",
            "59 23 31 * *",
            "5 4 * * SUN",
            "0 */6 10-20/5 JAN-JUN *",
            "@hourly",
        ];
        for expr in exprs {
            let c = Cron::parse(expr).unwrap();
            let mut t = ts("2024-02-27T22:13:10Z");
            for _ in 0..6 {
                let got = next_cron(&c, &TimeZone::UTC, t).unwrap().unwrap();
                let mut probe = Timestamp::from_second((t.as_second() / 60 + 1) * 60).unwrap();
                loop {
                    let dt = TimeZone::UTC.to_datetime(probe);
                    let wd = dt.weekday().to_sunday_zero_offset() as u8;
                    let (m, h, d, mo) = (dt.minute(), dt.hour(), dt.day(), dt.month());
                    if c.matches(m as u8, h as u8, d as u8, mo as u8, wd) {
                        break;
                    }
                    probe = Timestamp::from_second(probe.as_second() + 60).unwrap();
                }
                assert_eq!(got, probe, "{expr} after {t}");
                t = got;
            }
        }
    }
}
