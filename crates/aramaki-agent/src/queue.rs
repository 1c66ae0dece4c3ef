//! The agent's on-disk queue: every record accepted stays on disk until the
//! server acknowledges it, across crashes, in bounded memory.
//!
//! # Layout
//!
//! `dir/seg-<first seq, 20 digits>.jsonl` are append-only segment files, one
//! JSON [`Record`] per line; a new one starts once the current one holds
//! `segment_records` records (a batch is never split, so a segment may run
//! over by one batch). `dir/state.json` holds what the segments cannot say:
//! the server's acknowledgement, the drop accounting, and the highest
//! sequence number handed out, so that numbers are never reused even after
//! every file was deleted. `dir/lock` keeps a second process out.
//!
//! Memory holds one byte offset per record on disk (8 bytes each), never a
//! body; reads go back to the files.
//!
//! # Durability
//!
//! A push writes its batch with one `write` and one `fdatasync` before it
//! returns; a new segment file also syncs the directory. The state file is
//! replaced atomically (write, fsync, rename, fsync the directory) on every
//! acknowledgement and on every push that drops records — *before* the batch
//! is appended, so that a crash in between leaves a drop that is recorded
//! but whose report is missing, which the next open detects and re-reports.
//! A crash mid-append leaves at most a torn last line, which the next open
//! cuts off; a bad line anywhere else is corruption and refuses to open.
//!
//! # Dropping
//!
//! At `capacity` unacknowledged records, a push drops the oldest ones to make
//! room and must tell the server, with a [`RecordBody::Dropped`] record that
//! takes a normal sequence number. The rule that keeps those reports from
//! being lost themselves: **at most one report is in the queue at a time**.
//! - Drops that happen while a report is queued (and not yet acknowledged)
//!   are added up in the state file as pending, not queued.
//! - When that report is acknowledged, the pending losses get a new report.
//! - When that report reaches the front and is itself dropped, its numbers
//!   are folded into the pending losses and a new report goes to the back of
//!   the same push. The newest record is never the one dropped (a batch must
//!   leave room for it), so the numbers always live on in a queued report or
//!   in the state file.
//!
//! A report therefore covers everything lost since the previous acknowledged
//! one: `count` is the number of records lost and `first_seq..=last_seq` the
//! span they lie in (which may also hold records that did get through, and
//! the folded reports). While the server is away, this costs one report per
//! `capacity` records instead of one per push.

use std::collections::VecDeque;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use aramaki_protocol::agent::{QueueSpan, Record, RecordBody};
use serde::{Deserialize, Serialize};

/// Most queue incarnations remembered (one per open while records wait).
const MAX_SPANS: usize = 64;

/// Records per segment file before a new one starts.
pub const SEGMENT_RECORDS: u64 = 4096;

const STATE_FILE: &str = "state.json";
const STATE_TMP: &str = "state.json.tmp";
const LOCK_FILE: &str = "lock";
const SEGMENT_PREFIX: &str = "seg-";
const SEGMENT_SUFFIX: &str = ".jsonl";

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("queue: cannot {action} {}: {cause}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    #[error("queue: {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    #[error("queue: {} line {line} {problem}; move the file away to start over", path.display())]
    Corrupt {
        path: PathBuf,
        line: u64,
        problem: String,
    },
    #[error("queue: state file {} is unreadable: {cause}", path.display())]
    State {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("queue: capacity must be at least 2 records (one for a drop report), got {0}")]
    Capacity(u64),
    #[error("queue: a batch of {len} records does not fit a queue of {capacity}")]
    BatchTooLarge { len: usize, capacity: u64 },
    #[error("queue: record {index} of the batch would not read back: {cause}")]
    Encode {
        index: usize,
        cause: serde_json::Error,
    },
    #[error("queue: an earlier write failed and could not be undone; reopen the queue")]
    Broken,
}

/// Records lost for lack of room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Loss {
    count: u64,
    first_seq: u64,
    last_seq: u64,
}

impl Loss {
    fn merge(a: Option<Loss>, b: Loss) -> Loss {
        match a {
            None => b,
            Some(a) => Loss {
                count: a.count + b.count,
                first_seq: a.first_seq.min(b.first_seq),
                last_seq: a.last_seq.max(b.last_seq),
            },
        }
    }

    fn body(self) -> RecordBody {
        RecordBody::Dropped {
            count: self.count,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
        }
    }
}

/// The one queued, unacknowledged drop report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Report {
    seq: u64,
    loss: Loss,
}

/// What `state.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
struct State {
    /// Everything up to here is committed by the server.
    acked: u64,
    /// Everything up to here that was not acknowledged is lost for lack of
    /// room.
    dropped_through: u64,
    /// The highest sequence number handed out (in memory: exactly; on disk:
    /// as of the last write, which the segments may have passed since).
    last_seq: u64,
    /// Records lost for lack of room over the queue's life.
    dropped_total: u64,
    report: Option<Report>,
    /// Losses that no queued report covers yet.
    pending: Option<Loss>,
    /// Who numbered the unacknowledged records: a random incarnation per
    /// open of the queue, from its first number on (oldest first). A copy
    /// restored from a backup brings back old incarnations; the server
    /// knows which ones it committed records of.
    spans: Vec<QueueSpan>,
}

impl State {
    /// Records at or below this are never handed out again.
    fn floor(&self) -> u64 {
        self.acked.max(self.dropped_through)
    }
}

/// The index of one segment file: where each of its records starts.
#[derive(Debug)]
struct Segment {
    first_seq: u64,
    /// Byte offset of record `first_seq + i`.
    offsets: Vec<u64>,
    /// Bytes in use (the end of the last record).
    len: u64,
}

impl Segment {
    fn count(&self) -> u64 {
        self.offsets.len() as u64
    }

    /// One past the last sequence number held.
    fn end(&self) -> u64 {
        self.first_seq + self.count()
    }

    /// Records held with a sequence number above `floor`.
    fn live_above(&self, floor: u64) -> u64 {
        self.end().saturating_sub(self.first_seq.max(floor + 1))
    }

    /// Byte range of records `from..to` (indexes).
    fn span(&self, from: usize, to: usize) -> (u64, u64) {
        let end = self.offsets.get(to).copied().unwrap_or(self.len);
        (self.offsets.get(from).copied().unwrap_or(end), end)
    }
}

/// How a push makes room.
#[derive(Debug, Clone, Copy)]
struct Plan {
    /// Records to drop from the front (0: none).
    drop: u64,
    /// The last sequence number dropped.
    through: u64,
    /// Whether the push appends a drop report.
    report: bool,
}

/// What [`Queue::reconcile`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renumbered {
    /// Unacknowledged records moved above the mark.
    pub count: u64,
    /// The old number of the first record moved.
    pub first: u64,
    /// Its new number.
    pub to: u64,
    /// The server's high-water mark.
    pub mark: u64,
}

fn new_incarnation() -> Result<String, QueueError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| QueueError::Io {
        action: "draw randomness for",
        path: PathBuf::from("the queue incarnation"),
        cause: io::Error::other(e.to_string()),
    })?;
    Ok(aramaki_protocol::keys::hex(&b))
}

/// The queue; see the module documentation.
pub struct Queue {
    dir: PathBuf,
    capacity: u64,
    segment_records: u64,
    segments: VecDeque<Segment>,
    state: State,
    /// Append handle on the last segment, opened on first use.
    writer: Option<File>,
    /// A failed append could not be rolled back: the tail is unknown.
    broken: bool,
    _lock: File,
}

impl Queue {
    /// Opens or creates the queue in `dir` (created 0700), holding at most
    /// `capacity` unacknowledged records. Recovers after a crash: a torn last
    /// line is cut off, and a drop whose report did not reach the disk is
    /// reported again.
    pub fn open(dir: &Path, capacity: u64) -> Result<Queue, QueueError> {
        Queue::open_with(dir, capacity, SEGMENT_RECORDS)
    }

    /// [`Queue::open`] with another segment size (small ones make tests
    /// cheap).
    pub fn open_with(dir: &Path, capacity: u64, segment_records: u64) -> Result<Queue, QueueError> {
        if capacity < 2 {
            return Err(QueueError::Capacity(capacity));
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create", dir))?;
        let lock = lock_dir(dir)?;
        let stored = load_state(dir)?;
        let mut queue = Queue {
            dir: dir.to_owned(),
            capacity,
            segment_records: segment_records.max(1),
            segments: scan_segments(dir)?,
            state: stored.clone(),
            writer: None,
            broken: false,
            _lock: lock,
        };
        queue.recover();
        queue.remove_dead_segments();
        queue.state.spans.push(QueueSpan {
            incarnation: new_incarnation()?,
            first_seq: queue.state.last_seq + 1,
        });
        queue.prune_spans();
        if queue.state != stored {
            queue.save(&queue.state)?;
        }
        if queue.state.pending.is_some() && queue.state.report.is_none() {
            queue.push(Vec::new())?;
        }
        Ok(queue)
    }

    /// Appends `bodies` durably (one write and one fdatasync for the batch)
    /// and returns their sequence numbers, dropping the oldest records first
    /// if there is no room. An empty batch still queues a drop report that
    /// is due.
    pub fn push(&mut self, bodies: Vec<RecordBody>) -> Result<Vec<u64>, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        let n = bodies.len() as u64;
        if n >= self.capacity {
            return Err(QueueError::BatchTooLarge {
                len: bodies.len(),
                capacity: self.capacity,
            });
        }
        let plan = self.plan(n);
        if n == 0 && !plan.report {
            return Ok(Vec::new());
        }
        let first = self.state.last_seq + 1;
        let mut records: Vec<Record> = (first..)
            .zip(bodies)
            .map(|(seq, body)| Record { seq, body })
            .collect();
        let next = self.after_drop(plan, first + n);
        if let Some(report) = next.report.filter(|_| plan.report) {
            records.push(Record {
                seq: report.seq,
                body: report.loss.body(),
            });
        }
        let lines = encode(&records)?;
        if plan.drop > 0 || plan.report {
            // Write-ahead: the drop and the report's number are on disk
            // before the report itself (see the module documentation).
            self.save(&next)?;
        }
        self.state = next;
        if let Err(e) = self.append(first, &lines) {
            self.unqueue_report(plan);
            return Err(e);
        }
        self.state.last_seq = first + lines.len() as u64 - 1;
        if plan.drop > 0 {
            self.remove_dead_segments();
        }
        Ok((first..first + n).collect())
    }

    /// Up to `max` unacknowledged records with a sequence number above
    /// `after`, in order, read back from disk.
    pub fn read(&self, after: u64, max: usize) -> Result<Vec<Record>, QueueError> {
        let start = after.max(self.state.floor()) + 1;
        let mut out = Vec::new();
        for seg in self.segments.iter().filter(|s| s.end() > start) {
            if out.len() >= max {
                break;
            }
            let from = start.saturating_sub(seg.first_seq) as usize;
            let to = seg.offsets.len().min(from + (max - out.len()));
            self.read_segment(seg, from, to, &mut out)?;
        }
        Ok(out)
    }

    /// Everything up to and including `up_to` is committed by the server:
    /// persist that, delete segment files that hold nothing unacknowledged,
    /// and queue a drop report if one was waiting for the last to get
    /// through.
    ///
    /// An acknowledgement beyond the last sequence number (the server knows
    /// records this queue lost, e.g. after its directory was wiped) moves the
    /// numbering past it, so that new records are not taken for duplicates.
    pub fn ack(&mut self, up_to: u64) -> Result<(), QueueError> {
        if up_to <= self.state.acked {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.acked = up_to;
        if up_to > next.last_seq {
            tracing::warn!(
                up_to,
                last_seq = next.last_seq,
                "server acknowledged records this queue never wrote; numbering continues above"
            );
            next.last_seq = up_to;
        }
        if next.report.is_some_and(|r| r.seq <= up_to) {
            next.report = None;
        }
        self.save(&next)?;
        self.state = next;
        self.prune_spans();
        self.remove_dead_segments();
        if self.state.pending.is_some() && self.state.report.is_none() && !self.broken {
            self.push(Vec::new())?;
        }
        Ok(())
    }

    /// The incarnations of the unacknowledged records (for the hello).
    pub fn spans(&self) -> Vec<QueueSpan> {
        self.state.spans.clone()
    }

    /// The server has committed records up to `mark`, from the queue
    /// incarnations in `known`. An unacknowledged record at or below the
    /// mark from an incarnation the server does not know is not a replay but
    /// a new record under a number the server already used: the queue's
    /// state was lost, or restored from an older copy, while the server was
    /// away. Then that record and every later one is renumbered above the
    /// mark (in order), rather than taken for a duplicate. Without `known`
    /// (a server that does not say), a mark beyond every number handed out
    /// is the only sign, and everything unacknowledged is renumbered: at
    /// worst a record arrives twice; none is lost. None if nothing is wrong.
    ///
    /// Crash-safe: the renumbered copies are appended durably before the
    /// state moves past the old numbers; a crash in between leaves both, and
    /// the server skips the old ones as replays.
    pub fn reconcile(
        &mut self,
        mark: u64,
        known: &[String],
    ) -> Result<Option<Renumbered>, QueueError> {
        let live = self.read(0, usize::try_from(self.depth()).unwrap_or(usize::MAX / 2))?;
        let cut = if known.is_empty() {
            (mark > self.state.last_seq).then_some(0)
        } else {
            live.iter()
                .map(|r| r.seq)
                .take_while(|seq| *seq <= mark)
                .find(|seq| {
                    self.span_of(*seq)
                        .is_some_and(|span| !known.contains(&span.incarnation))
                })
                .or((mark > self.state.last_seq).then_some(0))
        };
        let Some(cut) = cut else {
            return Ok(None);
        };
        if self.broken {
            return Err(QueueError::Broken);
        }
        // Above the mark and above every old number, so that the copies
        // never share a number with the originals still on disk.
        let first = mark.max(self.state.last_seq) + 1;
        let moved: Vec<&Record> = live.iter().filter(|r| r.seq >= cut).collect();
        let records: Vec<Record> = (first..)
            .zip(&moved)
            .map(|(seq, r)| Record {
                seq,
                body: r.body.clone(),
            })
            .collect();
        let count = records.len() as u64;
        let mut next = self.state.clone();
        next.acked = first - 1;
        next.last_seq = first - 1 + count;
        next.report = self.state.report.and_then(|report| {
            let at = moved.iter().position(|r| r.seq == report.seq)?;
            Some(Report {
                seq: first + at as u64,
                loss: report.loss,
            })
        });
        let current = self
            .state
            .spans
            .last()
            .map(|s| s.incarnation.clone())
            .unwrap_or_default();
        next.spans = vec![QueueSpan {
            incarnation: current,
            first_seq: first,
        }];
        let old_segments = self.segments.len();
        if !records.is_empty() {
            let lines = encode(&records)?;
            // A file of their own, so that the old ones can go whole.
            self.start_segment(first)?;
            self.append(first, &lines)?;
        }
        self.save(&next)?;
        let done = Renumbered {
            count,
            first: moved.first().map_or(first, |r| r.seq),
            to: first,
            mark,
        };
        self.state = next;
        // Every old record is now acknowledged or copied: the old files go.
        for _ in 0..old_segments {
            let Some(seg) = self.segments.pop_front() else {
                break;
            };
            let path = self.segment_path(seg.first_seq);
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot delete queue segment");
            }
        }
        if self.segments.is_empty() {
            self.writer = None;
        }
        Ok(Some(done))
    }

    /// The incarnation that numbered `seq` (None for records older than
    /// incarnations, which are taken as known).
    fn span_of(&self, seq: u64) -> Option<&QueueSpan> {
        self.state.spans.iter().rev().find(|s| s.first_seq <= seq)
    }

    /// Forgets incarnations that number nothing unacknowledged any more
    /// (the current one always stays), and the oldest beyond
    /// [`MAX_SPANS`] (an agent restarting in a loop while the server is
    /// away; their records then count as known: at worst not renumbered).
    fn prune_spans(&mut self) {
        let floor = self.state.floor();
        while self.state.spans.len() > 1 && self.state.spans[1].first_seq <= floor + 1 {
            self.state.spans.remove(0);
        }
        let excess = self.state.spans.len().saturating_sub(MAX_SPANS);
        self.state.spans.drain(..excess);
    }

    /// Unacknowledged records (drop reports included).
    pub fn depth(&self) -> u64 {
        let floor = self.state.floor();
        self.segments.iter().map(|s| s.live_above(floor)).sum()
    }

    /// Records dropped for lack of room over the queue's life.
    pub fn dropped(&self) -> u64 {
        self.state.dropped_total
    }

    /// The server's acknowledgement: everything up to here is committed.
    pub fn acked(&self) -> u64 {
        self.state.acked
    }

    /// The highest sequence number handed out so far.
    pub fn last_seq(&self) -> u64 {
        self.state.last_seq
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// How many oldest records a push of `n` must drop, and whether it must
    /// append a report: one is due if losses are pending with no report
    /// queued, or if the queued report is among the dropped.
    fn plan(&self, n: u64) -> Plan {
        let depth = self.depth();
        let mut report = self.state.pending.is_some() && self.state.report.is_none();
        loop {
            let drop = (depth + n + u64::from(report)).saturating_sub(self.capacity);
            if drop == 0 {
                return Plan {
                    drop,
                    through: 0,
                    report,
                };
            }
            let through = self.nth_live_seq(drop).unwrap_or(self.state.last_seq);
            let needed = self.state.report.is_none_or(|r| r.seq <= through);
            if needed == report {
                return Plan {
                    drop,
                    through,
                    report,
                };
            }
            report = needed;
        }
    }

    /// The state after carrying out `plan`, with a new report (if planned)
    /// numbered `report_seq`.
    fn after_drop(&self, plan: Plan, report_seq: u64) -> State {
        let mut next = self.state.clone();
        if plan.drop > 0 {
            let folded = next.report.filter(|r| r.seq <= plan.through);
            let lost = plan.drop - u64::from(folded.is_some());
            let first_seq = self.nth_live_seq(1).unwrap_or(plan.through);
            let mut pending = next.pending;
            if let Some(r) = folded {
                pending = Some(Loss::merge(pending, r.loss));
                next.report = None;
            }
            next.pending = Some(Loss::merge(
                pending,
                Loss {
                    count: lost,
                    first_seq,
                    last_seq: plan.through,
                },
            ));
            next.dropped_through = plan.through;
            next.dropped_total += lost;
        }
        if plan.report {
            if let Some(loss) = next.pending.take() {
                next.report = Some(Report {
                    seq: report_seq,
                    loss,
                });
            }
        }
        next
    }

    /// After a failed append, a planned report is not on disk: its losses
    /// are pending again, to be reported by the next push or open.
    fn unqueue_report(&mut self, plan: Plan) {
        if !plan.report {
            return;
        }
        if let Some(report) = self.state.report.take() {
            self.state.pending = Some(Loss::merge(self.state.pending, report.loss));
        }
    }

    /// The sequence number of the `n`-th (from 1) unacknowledged record.
    fn nth_live_seq(&self, n: u64) -> Option<u64> {
        let floor = self.state.floor();
        let mut left = n;
        for seg in &self.segments {
            let live = seg.live_above(floor);
            if left <= live {
                return Some(seg.end() - live + left - 1);
            }
            left -= live;
        }
        None
    }

    /// Makes the in-memory state agree with the segments found on disk.
    fn recover(&mut self) {
        let disk_last = self.segments.back().map_or(0, |s| s.end() - 1);
        let floor = self.state.floor();
        self.state.last_seq = self.state.last_seq.max(disk_last).max(floor);
        if let Some(report) = self.state.report {
            if report.seq <= self.state.acked {
                self.state.report = None;
            } else if report.seq > disk_last || report.seq <= floor {
                tracing::warn!(
                    seq = report.seq,
                    "drop report missing from disk, reporting again"
                );
                self.state.report = None;
                self.state.pending = Some(Loss::merge(self.state.pending, report.loss));
            }
        }
        self.warn_about_gaps(floor);
    }

    /// Records missing between the acknowledged ones and the last one are
    /// not something this code does; say so rather than hide it.
    fn warn_about_gaps(&self, floor: u64) {
        let mut expected = floor + 1;
        for seg in &self.segments {
            if seg.end() <= expected {
                continue;
            }
            if seg.first_seq > expected {
                tracing::warn!(
                    first = expected,
                    last = seg.first_seq - 1,
                    "queue records missing from disk"
                );
            }
            expected = seg.end();
        }
    }

    /// Deletes segment files that hold nothing unacknowledged. A file that
    /// cannot be deleted stays indexed and is tried again next time.
    fn remove_dead_segments(&mut self) {
        let floor = self.state.floor();
        while let Some(seg) = self.segments.front() {
            if seg.end() > floor + 1 {
                break;
            }
            let path = self.segment_path(seg.first_seq);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete queue segment");
                    return;
                }
            }
            self.segments.pop_front();
            if self.segments.is_empty() {
                self.writer = None;
            }
        }
    }

    /// Appends encoded records numbered from `first`, starting a segment if
    /// the current one is full or does not continue at `first`.
    fn append(&mut self, first: u64, lines: &[Vec<u8>]) -> Result<(), QueueError> {
        let rotate = self
            .segments
            .back()
            .is_none_or(|s| s.count() >= self.segment_records || s.end() != first);
        if rotate {
            self.start_segment(first)?;
        }
        let path = self.segment_path(self.segments.back().map_or(first, |s| s.first_seq));
        let old_len = self.segments.back().map_or(0, |s| s.len);
        let mut offsets = Vec::with_capacity(lines.len());
        let mut buf = Vec::with_capacity(lines.iter().map(Vec::len).sum());
        for line in lines {
            offsets.push(old_len + buf.len() as u64);
            buf.extend_from_slice(line);
        }
        let writer = self.writer(&path)?;
        let written = writer
            .write_all(&buf)
            .and_then(|()| writer.sync_data())
            .map_err(io_err("append to", &path));
        if let Err(e) = written {
            // Cut off whatever part of the batch got in, or give up on the
            // file until a reopen repairs its tail.
            if writer.set_len(old_len).is_err() {
                self.broken = true;
            }
            return Err(e);
        }
        if let Some(seg) = self.segments.back_mut() {
            seg.offsets.extend(offsets);
            seg.len = old_len + buf.len() as u64;
        }
        Ok(())
    }

    fn start_segment(&mut self, first: u64) -> Result<(), QueueError> {
        let path = self.segment_path(first);
        // Append mode, so that a write after a rolled-back one lands at the
        // end rather than at a stale position.
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err("create", &path))?;
        sync_dir(&self.dir)?;
        self.writer = Some(file);
        self.segments.push_back(Segment {
            first_seq: first,
            offsets: Vec::new(),
            len: 0,
        });
        Ok(())
    }

    fn writer(&mut self, path: &Path) -> Result<&mut File, QueueError> {
        let file = match self.writer.take() {
            Some(file) => file,
            None => OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(io_err("open", path))?,
        };
        Ok(self.writer.insert(file))
    }

    /// Reads records `from..to` (indexes) of a segment into `out`.
    fn read_segment(
        &self,
        seg: &Segment,
        from: usize,
        to: usize,
        out: &mut Vec<Record>,
    ) -> Result<(), QueueError> {
        if from >= to {
            return Ok(());
        }
        let path = self.segment_path(seg.first_seq);
        let (start, end) = seg.span(from, to);
        let mut file = File::open(&path).map_err(io_err("open", &path))?;
        file.seek(SeekFrom::Start(start))
            .map_err(io_err("seek in", &path))?;
        let mut buf = vec![0; (end - start) as usize];
        file.read_exact(&mut buf).map_err(io_err("read", &path))?;
        for (i, line) in (from..to).zip(buf.split(|&b| b == b'\n')) {
            let expected = seg.first_seq + i as u64;
            let record = check_line(line, expected).map_err(|problem| QueueError::Corrupt {
                path: path.clone(),
                line: i as u64 + 1,
                problem,
            })?;
            out.push(record);
        }
        Ok(())
    }

    fn save(&self, state: &State) -> Result<(), QueueError> {
        let tmp = self.dir.join(STATE_TMP);
        let path = self.dir.join(STATE_FILE);
        let bytes = serde_json::to_vec(state).map_err(|cause| QueueError::State {
            path: path.clone(),
            cause,
        })?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .map_err(io_err("write", &tmp))?;
        fs::rename(&tmp, &path).map_err(io_err("replace", &path))?;
        sync_dir(&self.dir)
    }

    fn segment_path(&self, first_seq: u64) -> PathBuf {
        self.dir.join(segment_name(first_seq))
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:020}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&seq| seq > 0)
}

/// Serializes each record as one line, refusing any that would not parse
/// back (a NaN metric becomes `null`): accepting a record the queue cannot
/// read would wedge delivery for good.
fn encode(records: &[Record]) -> Result<Vec<Vec<u8>>, QueueError> {
    records
        .iter()
        .enumerate()
        .map(|(index, record)| {
            let mut line = serde_json::to_vec(record)
                .and_then(|line| serde_json::from_slice::<Record>(&line).map(|_| line))
                .map_err(|cause| QueueError::Encode { index, cause })?;
            line.push(b'\n');
            Ok(line)
        })
        .collect()
}

/// Decodes one line (without its newline) and checks its number.
fn check_line(line: &[u8], expected: u64) -> Result<Record, String> {
    let record: Record =
        serde_json::from_slice(line).map_err(|e| format!("is not a record: {e}"))?;
    if record.seq != expected {
        return Err(format!(
            "holds seq {} where {expected} was expected",
            record.seq
        ));
    }
    Ok(record)
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> QueueError {
    let path = path.to_owned();
    move |cause| QueueError::Io {
        action,
        path,
        cause,
    }
}

fn sync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

/// Takes an exclusive `flock` on `dir/lock`, held as long as the file stays
/// open: two agents appending to one queue would interleave their records.
fn lock_dir(dir: &Path) -> Result<File, QueueError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_err("create", &path))?;
    // SAFETY: flock takes a descriptor and flags and touches no memory; the
    // descriptor is valid while `file` lives.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(file);
    }
    let cause = io::Error::last_os_error();
    if cause.kind() == io::ErrorKind::WouldBlock {
        Err(QueueError::Locked { path })
    } else {
        Err(QueueError::Io {
            action: "lock",
            path,
            cause,
        })
    }
}

fn load_state(dir: &Path) -> Result<State, QueueError> {
    let path = dir.join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|cause| QueueError::State { path, cause })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
        Err(cause) => Err(QueueError::Io {
            action: "read",
            path,
            cause,
        }),
    }
}

/// Indexes every segment file in order. Only the last one may end in a torn
/// or garbled line (a crash mid-append): it is cut off there. Empty files
/// are deleted, so that a segment's name always matches its first record.
fn scan_segments(dir: &Path) -> Result<VecDeque<Segment>, QueueError> {
    let mut firsts: Vec<u64> = fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .filter_map(|entry| parse_segment_name(&entry.ok()?.file_name().to_string_lossy()))
        .collect();
    firsts.sort_unstable();
    let mut segments = VecDeque::with_capacity(firsts.len());
    for (i, &first) in firsts.iter().enumerate() {
        let path = dir.join(segment_name(first));
        let seg = scan_segment(&path, first, i + 1 == firsts.len())?;
        if seg.count() == 0 {
            fs::remove_file(&path).map_err(io_err("delete", &path))?;
        } else {
            segments.push_back(seg);
        }
    }
    Ok(segments)
}

fn scan_segment(path: &Path, first_seq: u64, is_last: bool) -> Result<Segment, QueueError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let mut reader = BufReader::new(file);
    let mut seg = Segment {
        first_seq,
        offsets: Vec::new(),
        len: 0,
    };
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(io_err("read", path))?;
        if n == 0 {
            return Ok(seg);
        }
        let problem = match line.strip_suffix(b"\n") {
            None => Err("is cut short".to_owned()),
            Some(body) => check_line(body, seg.end()).map(drop),
        };
        if let Err(problem) = problem {
            if !is_last {
                return Err(QueueError::Corrupt {
                    path: path.to_owned(),
                    line: seg.count() + 1,
                    problem,
                });
            }
            tracing::warn!(
                path = %path.display(),
                line = seg.count() + 1,
                problem,
                "cutting off the torn end of the queue"
            );
            truncate(path, seg.len)?;
            return Ok(seg);
        }
        seg.offsets.push(seg.len);
        seg.len += n as u64;
    }
}

fn truncate(path: &Path, len: u64) -> Result<(), QueueError> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    file.set_len(len)
        .and_then(|()| file.sync_data())
        .map_err(io_err("truncate", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aramaki_protocol::agent::{CheckResult, Metric};
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    fn result(name: &str) -> RecordBody {
        RecordBody::Result(CheckResult {
            check: name.to_owned(),
            system: None,
            labels: BTreeMap::new(),
            status: 0,
            output: format!("OK - {name}\nsecond line"),
            metrics: vec![],
            executed_at: 1_700_000_000_000_000,
            duration_ms: 3,
            source: "check".into(),
        })
    }

    fn results(names: std::ops::Range<u32>) -> Vec<RecordBody> {
        names.map(|i| result(&format!("c{i}"))).collect()
    }

    fn seqs(records: &[Record]) -> Vec<u64> {
        records.iter().map(|r| r.seq).collect()
    }

    fn check_name(record: &Record) -> &str {
        match &record.body {
            RecordBody::Result(r) => &r.check,
            other => panic!("not a result: {other:?}"),
        }
    }

    fn dropped(count: u64, first_seq: u64, last_seq: u64) -> RecordBody {
        RecordBody::Dropped {
            count,
            first_seq,
            last_seq,
        }
    }

    fn segment_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(SEGMENT_PREFIX))
            .collect();
        names.sort();
        names
    }

    fn last_segment(dir: &Path) -> PathBuf {
        dir.join(segment_files(dir).pop().unwrap())
    }

    #[test]
    fn push_read_ack_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("queue");
        let mut q = Queue::open(&dir, 100).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(q.push(results(0..3)).unwrap(), vec![1, 2, 3]);
        assert_eq!((q.depth(), q.last_seq(), q.acked()), (3, 3, 0));
        let got = q.read(0, 10).unwrap();
        assert_eq!(seqs(&got), vec![1, 2, 3]);
        assert_eq!(got[1].body, result("c1"));
        q.ack(2).unwrap();
        assert_eq!((q.depth(), q.acked()), (1, 2));
        assert_eq!(seqs(&q.read(0, 10).unwrap()), vec![3]);
        q.ack(1).unwrap();
        assert_eq!(q.acked(), 2, "a stale ack changes nothing");
        assert_eq!(q.push(Vec::new()).unwrap(), Vec::<u64>::new());
        assert_eq!(q.last_seq(), 3);
    }

    #[test]
    fn reopen_keeps_unacked_and_continues_numbering() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Queue::open(tmp.path(), 100).unwrap();
        q.push(results(0..5)).unwrap();
        q.ack(2).unwrap();
        drop(q);
        let mut q = Queue::open(tmp.path(), 100).unwrap();
        assert_eq!((q.depth(), q.acked(), q.last_seq()), (3, 2, 5));
        let got = q.read(0, 10).unwrap();
        assert_eq!(seqs(&got), vec![3, 4, 5]);
        assert_eq!(check_name(&got[0]), "c2");
        assert_eq!(q.push(results(5..6)).unwrap(), vec![6]);
        // Everything acknowledged and deleted: numbers still go on.
        q.ack(6).unwrap();
        assert!(segment_files(tmp.path()).is_empty());
        drop(q);
        let mut q = Queue::open(tmp.path(), 100).unwrap();
        assert_eq!((q.depth(), q.last_seq()), (0, 6));
        assert_eq!(q.push(results(0..1)).unwrap(), vec![7]);
    }

    #[test]
    fn second_open_of_one_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _q = Queue::open(tmp.path(), 10).unwrap();
        let err = Queue::open(tmp.path(), 10).err().unwrap();
        assert!(matches!(err, QueueError::Locked { .. }), "{err}");
    }

    #[test]
    fn torn_last_line_is_cut_off() {
        for tail in [
            &b"{\"seq\":4,\"kind\":\"resu"[..],
            b"\0\0\0\0\n\0\0",
            b"garbage\n",
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let mut q = Queue::open(tmp.path(), 100).unwrap();
            q.push(results(0..3)).unwrap();
            drop(q);
            let path = last_segment(tmp.path());
            let good_len = fs::metadata(&path).unwrap().len();
            let mut f = OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(tail).unwrap();
            drop(f);
            let mut q = Queue::open(tmp.path(), 100).unwrap();
            assert_eq!(fs::metadata(&path).unwrap().len(), good_len);
            assert_eq!(seqs(&q.read(0, 10).unwrap()), vec![1, 2, 3]);
            assert_eq!(q.push(results(3..4)).unwrap(), vec![4]);
            let got = q.read(0, 10).unwrap();
            assert_eq!(seqs(&got), vec![1, 2, 3, 4]);
            assert_eq!(check_name(&got[3]), "c3");
        }
    }

    #[test]
    fn corruption_before_the_end_refuses_to_open() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Queue::open_with(tmp.path(), 100, 2).unwrap();
        q.push(results(0..2)).unwrap();
        q.push(results(2..4)).unwrap();
        drop(q);
        let first = tmp.path().join(segment_name(1));
        let text = fs::read_to_string(&first)
            .unwrap()
            .replacen("c0", "c0\"", 1);
        fs::write(&first, text).unwrap();
        let err = Queue::open(tmp.path(), 100).err().unwrap();
        assert!(matches!(err, QueueError::Corrupt { line: 1, .. }), "{err}");
    }

    #[test]
    fn overflow_drops_oldest_and_reports_it() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Queue::open(tmp.path(), 10).unwrap();
        q.push(results(0..5)).unwrap();
        q.push(results(5..10)).unwrap();
        assert_eq!((q.depth(), q.dropped()), (10, 0), "full, nothing lost yet");
        assert_eq!(q.push(results(10..11)).unwrap(), vec![11]);
        // Two records go: one for the new result, one for the report.
        assert_eq!((q.depth(), q.dropped(), q.last_seq()), (10, 2, 12));
        let got = q.read(0, 100).unwrap();
        assert_eq!(seqs(&got), (3..=12).collect::<Vec<_>>());
        assert_eq!(check_name(&got[0]), "c2");
        assert_eq!(got[9].body, dropped(2, 1, 2));
        drop(q);
        let mut q = Queue::open(tmp.path(), 10).unwrap();
        assert_eq!((q.depth(), q.dropped(), q.last_seq()), (10, 2, 12));
        // With a report still queued, further losses wait for it.
        assert_eq!(q.push(results(11..12)).unwrap(), vec![13]);
        assert_eq!((q.depth(), q.dropped()), (10, 3));
        assert_eq!(seqs(&q.read(0, 100).unwrap()), (4..=13).collect::<Vec<_>>());
        // Once the report got through, the next one is queued.
        q.ack(12).unwrap();
        let got = q.read(0, 100).unwrap();
        assert_eq!(seqs(&got), vec![13, 14]);
        assert_eq!(got[1].body, dropped(1, 3, 3));
        drop(q);
        let q = Queue::open(tmp.path(), 10).unwrap();
        assert_eq!((q.dropped(), q.last_seq(), q.depth()), (3, 14, 2));
    }

    #[test]
    fn a_dropped_report_lives_on_in_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Queue::open(tmp.path(), 4).unwrap();
        q.push(results(0..2)).unwrap();
        q.push(results(2..4)).unwrap();
        q.push(results(4..5)).unwrap(); // drops 1-2, report at 6
        for i in 5..9 {
            q.push(results(i..i + 1)).unwrap();
        }
        // The report at 6 reached the front and was dropped with 3, 4, 5
        // and 7: the report at 11 says so, together with 1 and 2.
        let got = q.read(0, 100).unwrap();
        assert_eq!(seqs(&got), vec![8, 9, 10, 11]);
        assert_eq!(got[3].body, dropped(6, 1, 7));
        assert_eq!(q.dropped(), 6);
        // The only report is never what a push drops.
        for i in 9..40 {
            q.push(results(i..i + 1)).unwrap();
            let got = q.read(0, 100).unwrap();
            let reports = got
                .iter()
                .filter(|r| matches!(r.body, RecordBody::Dropped { .. }))
                .count();
            assert_eq!(reports, 1, "{:?}", seqs(&got));
            assert_eq!(q.depth(), 4);
        }
        let got = q.read(0, 100).unwrap();
        let total: u64 = got
            .iter()
            .map(|r| match r.body {
                RecordBody::Dropped { count, .. } => count,
                _ => 0,
            })
            .sum();
        let pending = q.state.pending.map_or(0, |l| l.count);
        assert_eq!(
            total + pending,
            q.dropped(),
            "every loss is reported or pending"
        );
    }

    #[test]
    fn a_report_lost_in_a_crash_is_made_again() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Queue::open(tmp.path(), 4).unwrap();
        q.push(results(0..2)).unwrap();
        q.push(results(2..4)).unwrap();
        q.push(results(4..5)).unwrap(); // drops 1-2; 5 and the report 6
        drop(q);
        // The crash: state written, append lost.
        let path = last_segment(tmp.path());
        let text = fs::read_to_string(&path).unwrap();
        let keep: Vec<&str> = text.lines().take(4).collect();
        fs::write(&path, keep.join("\n") + "\n").unwrap();
        let q = Queue::open(tmp.path(), 4).unwrap();
        let got = q.read(0, 100).unwrap();
        assert_eq!(seqs(&got), vec![3, 4, 5]);
        assert_eq!(got[2].body, dropped(2, 1, 2));
        assert_eq!(q.dropped(), 2);
    }

    #[test]
    fn ack_deletes_segment_files() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Queue::open_with(tmp.path(), 1000, 10).unwrap();
        for i in 0..7 {
            q.push(results(i * 5..i * 5 + 5)).unwrap();
        }
        assert_eq!(segment_files(tmp.path()).len(), 4);
        q.ack(19).unwrap();
        assert_eq!(segment_files(tmp.path()).len(), 3, "11-20 still holds 20");
        q.ack(20).unwrap();
        assert_eq!(
            segment_files(tmp.path()),
            vec![segment_name(21), segment_name(31)]
        );
        q.ack(35).unwrap();
        assert!(segment_files(tmp.path()).is_empty());
        assert_eq!(q.push(results(0..1)).unwrap(), vec![36]);
        assert_eq!(segment_files(tmp.path()), vec![segment_name(36)]);
    }

    #[test]
    fn many_records_read_back_once_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Queue::open(tmp.path(), 100_000).unwrap();
        let mut next = 0;
        let mut size = 1;
        while next < 10_000 {
            let end = (next + size).min(10_000);
            let got = q.push(results(next..end)).unwrap();
            assert_eq!(
                got,
                (u64::from(next) + 1..=u64::from(end)).collect::<Vec<_>>()
            );
            next = end;
            size = size % 97 + 13;
        }
        assert_eq!(segment_files(tmp.path()).len(), 3);
        drop(q);
        let mut q = Queue::open(tmp.path(), 100_000).unwrap();
        assert_eq!(q.depth(), 10_000);
        let mut after = 0;
        let mut seen = 0;
        loop {
            let batch = q.read(after, 333).unwrap();
            let Some(last) = batch.last() else { break };
            for r in &batch {
                assert_eq!(r.seq, seen + 1);
                assert_eq!(check_name(r), format!("c{seen}"));
                seen += 1;
            }
            after = last.seq;
            if seen % 999 == 0 {
                q.ack(after).unwrap();
            }
        }
        assert_eq!(seen, 10_000);
        q.ack(10_000).unwrap();
        assert_eq!(q.depth(), 0);
        assert!(segment_files(tmp.path()).is_empty());
    }

    #[test]
    fn read_after_skips_past_partial_ack() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Queue::open_with(tmp.path(), 100, 4).unwrap();
        q.push(results(0..10)).unwrap();
        q.ack(4).unwrap();
        assert_eq!(seqs(&q.read(0, 3).unwrap()), vec![5, 6, 7]);
        assert_eq!(seqs(&q.read(2, 2).unwrap()), vec![5, 6]);
        assert_eq!(seqs(&q.read(6, 100).unwrap()), vec![7, 8, 9, 10]);
        assert!(q.read(10, 100).unwrap().is_empty());
        assert!(q.read(99, 100).unwrap().is_empty());
        assert!(q.read(0, 0).unwrap().is_empty());
        q.push(results(10..12)).unwrap();
        assert_eq!(seqs(&q.read(9, 100).unwrap()), vec![10, 11, 12]);
    }

    #[test]
    fn an_ack_beyond_the_end_moves_numbering_on() {
        let tmp = tempfile::tempdir().unwrap();
        let mut q = Queue::open(tmp.path(), 10).unwrap();
        q.push(results(0..2)).unwrap();
        q.ack(500).unwrap();
        assert_eq!((q.depth(), q.last_seq()), (0, 500));
        assert_eq!(q.push(results(2..3)).unwrap(), vec![501]);
        drop(q);
        let q = Queue::open(tmp.path(), 10).unwrap();
        assert_eq!(seqs(&q.read(0, 10).unwrap()), vec![501]);
    }

    #[test]
    fn a_restored_queue_renumbers_above_the_servers_mark() {
        let tmp = tempfile::tempdir().unwrap();
        let backup = tempfile::tempdir().unwrap();
        let mut known = Vec::new();
        let mut q = Queue::open_with(tmp.path(), 100, 4).unwrap();
        known.extend(q.spans().into_iter().map(|s| s.incarnation));
        q.push(results(0..5)).unwrap();
        q.ack(5).unwrap();
        drop(q);
        copy_dir(tmp.path(), backup.path());
        // Later: 10 more committed by the server, then the state is restored.
        let mut q = Queue::open_with(tmp.path(), 100, 4).unwrap();
        known.extend(q.spans().into_iter().map(|s| s.incarnation));
        q.push(results(5..15)).unwrap();
        assert_eq!(q.reconcile(10, &known).unwrap(), None, "a normal replay");
        q.ack(15).unwrap();
        drop(q);
        fs::remove_dir_all(tmp.path()).unwrap();
        copy_dir(backup.path(), tmp.path());
        let mut q = Queue::open_with(tmp.path(), 100, 4).unwrap();
        // New results while the server is away take numbers it has used.
        assert_eq!(
            q.push(results(100..110)).unwrap(),
            (6..=15).collect::<Vec<_>>()
        );
        let done = q.reconcile(15, &known).unwrap().unwrap();
        assert_eq!(
            done,
            Renumbered {
                count: 10,
                first: 6,
                to: 16,
                mark: 15
            }
        );
        let back = q.read(15, 100).unwrap();
        assert_eq!(seqs(&back), (16..=25).collect::<Vec<_>>());
        let names: Vec<&str> = back.iter().map(check_name).collect();
        let expected: Vec<String> = (100..110).map(|i| format!("c{i}")).collect();
        assert_eq!(
            names,
            expected.iter().map(String::as_str).collect::<Vec<_>>()
        );
        assert_eq!((q.acked(), q.last_seq(), q.depth()), (15, 25, 10));
        known.extend(q.spans().into_iter().map(|s| s.incarnation));
        assert_eq!(q.reconcile(15, &known).unwrap(), None, "once");
        drop(q);
        // It survives a reopen, and numbering goes on above.
        let mut q = Queue::open_with(tmp.path(), 100, 4).unwrap();
        assert_eq!(
            seqs(&q.read(0, 100).unwrap()),
            (16..=25).collect::<Vec<_>>()
        );
        assert_eq!(q.push(results(0..1)).unwrap(), vec![26]);
        // A server that names no incarnations: only a mark beyond every
        // number tells, and then everything unacknowledged moves.
        let empty = tempfile::tempdir().unwrap();
        let mut q = Queue::open(empty.path(), 10).unwrap();
        q.push(results(0..2)).unwrap();
        assert_eq!(q.reconcile(2, &[]).unwrap(), None);
        assert_eq!(segment_files(empty.path()).len(), 1);
        let done = q.reconcile(40, &[]).unwrap().unwrap();
        assert_eq!(segment_files(empty.path()).len(), 1, "the old file went");
        assert_eq!((done.count, done.first), (2, 1));
        assert_eq!(seqs(&q.read(0, 10).unwrap()), vec![41, 42]);
        assert_eq!(q.push(results(0..1)).unwrap(), vec![43]);

        // A mark below the last number: the copies go to a file of their
        // own above every old number, and the old file goes.
        let one = tempfile::tempdir().unwrap();
        let mut q = Queue::open_with(one.path(), 100, 100).unwrap();
        q.push(results(0..5)).unwrap();
        let done = q
            .reconcile(3, &["someone else".to_owned()])
            .unwrap()
            .unwrap();
        assert_eq!((done.count, done.first, done.to), (5, 1, 6));
        assert_eq!(seqs(&q.read(0, 100).unwrap()), (6..=10).collect::<Vec<_>>());
        drop(q);
        let q = Queue::open_with(one.path(), 100, 100).unwrap();
        let back = q.read(0, 100).unwrap();
        assert_eq!(seqs(&back), (6..=10).collect::<Vec<_>>());
        assert_eq!(check_name(&back[0]), "c0");
        assert_eq!(segment_files(one.path()).len(), 1);
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_name() != LOCK_FILE {
                fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
    }

    #[test]
    fn refuses_what_it_could_not_keep() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(
            Queue::open(tmp.path(), 1).err().unwrap(),
            QueueError::Capacity(1)
        ));
        let mut q = Queue::open(tmp.path(), 5).unwrap();
        assert!(matches!(
            q.push(results(0..5)).unwrap_err(),
            QueueError::BatchTooLarge { len: 5, .. }
        ));
        let RecordBody::Result(mut bad) = result("nan") else {
            unreachable!()
        };
        bad.metrics.push(Metric {
            name: "x".into(),
            value: f64::NAN,
            unit: String::new(),
            warn: None,
            crit: None,
            min: None,
            max: None,
        });
        let err = q
            .push(vec![result("ok"), RecordBody::Result(bad)])
            .unwrap_err();
        assert!(matches!(err, QueueError::Encode { index: 1, .. }), "{err}");
        assert_eq!(q.last_seq(), 0, "nothing of the batch was taken");
        assert_eq!(q.push(results(0..1)).unwrap(), vec![1]);
    }
}
