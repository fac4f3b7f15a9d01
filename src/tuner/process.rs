//! The parent side of the tuner protocol: start one child per
//! configuration, read its lines as they come, and kill it when a measured
//! run is already slower than the best so far or when it stops reporting.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::child::{ChildError, Line, Request, CHILD_ENV, REQUEST_ENV};
use crate::{Error, Result};

/// How to start a child: the executable and its arguments. The request
/// travels in the environment.
#[derive(Debug, Clone)]
pub(crate) struct ChildCommand {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

/// How a child ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ending {
    /// Every run reported, then the final line.
    Finished,
    /// Killed after a measured run slower than `best_s`.
    Slower { best_s: f64 },
    /// The child reported an error.
    Failed(ChildError),
    /// Exited or was killed by a signal without a final line.
    Crashed(String),
    /// No line for longer than the timeout.
    TimedOut(Duration),
}

/// What a child reported and how it ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChildReport {
    /// The warm-up run's time.
    pub warmup_s: Option<f64>,
    /// Measured runs' times, in order.
    pub runs: Vec<f64>,
    /// How it ended.
    pub ending: Ending,
}

/// Starts a child for `req`, reads its lines, and returns when it has ended.
///
/// `kill_above`: a measured run slower than this ends the child at once.
/// `timeout`: the longest the child may go without writing a line.
/// `echo_stderr`: copy the child's stderr to ours as it comes (it is kept for
/// crash reasons either way).
pub(crate) fn run_child(
    cmd: &ChildCommand,
    req: &Request,
    kill_above: Option<f64>,
    timeout: Duration,
    echo_stderr: bool,
) -> Result<ChildReport> {
    let mut running = Running::spawn(cmd, req, echo_stderr)?;
    let watched = running.watch(kill_above, timeout);
    running.finish(watched, timeout)
}

/// A child being measured, and the threads reading its output.
struct Running {
    child: Child,
    lines: mpsc::Receiver<Line>,
    out_reader: JoinHandle<()>,
    err_reader: JoinHandle<Option<String>>,
}

/// What the child reported while it was watched.
struct Watched {
    report: ChildReport,
    /// The error line it reported, if any.
    error: Option<ChildError>,
    /// It wrote its final line.
    done: bool,
    /// Why it was killed, if it was.
    killed: Option<Ending>,
    last_line: Instant,
}

impl Running {
    fn spawn(cmd: &ChildCommand, req: &Request, echo_stderr: bool) -> Result<Running> {
        let json = serde_json::to_string(req)
            .map_err(|e| Error::Pipeline(format!("cannot serialize the child request: {e}")))?;
        let mut command = Command::new(&cmd.exe);
        command
            .args(&cmd.args)
            .env(CHILD_ENV, "1")
            .env(REQUEST_ENV, json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut command);
        let mut child = command
            .spawn()
            .map_err(|e| Error::io("starting the tuner child", &cmd.exe, None, e))?;
        let (tx, lines) = mpsc::channel::<Line>();
        let stdout = child.stdout.take();
        let out_reader = std::thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(msg) = serde_json::from_str::<Line>(line.trim()) {
                    if tx.send(msg).is_err() {
                        break;
                    }
                }
            }
        });
        let stderr = child.stderr.take();
        let err_reader = std::thread::spawn(move || stderr.map(|s| tail_of(s, echo_stderr)));
        Ok(Running {
            child,
            lines,
            out_reader,
            err_reader,
        })
    }

    /// Reads lines until the child is done, fails, stops writing, or must be
    /// killed.
    fn watch(&mut self, kill_above: Option<f64>, timeout: Duration) -> Watched {
        let mut w = Watched {
            report: ChildReport {
                warmup_s: None,
                runs: Vec::new(),
                ending: Ending::Crashed(String::new()),
            },
            error: None,
            done: false,
            killed: None,
            last_line: Instant::now(),
        };
        w.killed = loop {
            let wait = timeout.saturating_sub(w.last_line.elapsed());
            let line = match self.lines.recv_timeout(wait) {
                Ok(line) => line,
                Err(RecvTimeoutError::Timeout) => break Some(Ending::TimedOut(timeout)),
                Err(RecvTimeoutError::Disconnected) => break None,
            };
            w.last_line = Instant::now();
            match line {
                Line::Run { run: 0, seconds } => w.report.warmup_s = Some(seconds),
                Line::Run { seconds, .. } => {
                    w.report.runs.push(seconds);
                    if let Some(best_s) = kill_above.filter(|&b| seconds > b) {
                        break Some(Ending::Slower { best_s });
                    }
                }
                // Every run is in: what the child does while exiting does not
                // change the measurement.
                Line::Done { .. } => {
                    w.done = true;
                    break None;
                }
                Line::Error { error } => w.error = Some(error),
            }
        };
        w
    }

    /// Ends the child (killing it if it must be), joins the readers and says
    /// how it ended.
    fn finish(mut self, w: Watched, timeout: Duration) -> Result<ChildReport> {
        let status = match w.killed {
            Some(_) => {
                // Ending an already-exited child is not an error: it may have
                // finished between the last line and this kill.
                let _ = self.child.kill();
                Some(wait(&mut self.child)?)
            }
            None => {
                let left = timeout.saturating_sub(w.last_line.elapsed());
                wait_with_timeout(&mut self.child, left)?
            }
        };
        let _ = self.out_reader.join();
        let stderr_tail = self.err_reader.join().ok().flatten().unwrap_or_default();
        let mut report = w.report;
        report.ending = match (w.killed, status) {
            (Some(k), _) => k,
            (None, _) if w.done => Ending::Finished,
            (None, None) => Ending::TimedOut(timeout),
            (None, Some(status)) => match w.error {
                Some(e) => Ending::Failed(e),
                None => Ending::Crashed(crash_reason(status, &stderr_tail)),
            },
        };
        Ok(report)
    }
}

/// Makes the child get `SIGKILL` when the thread that starts it ends
/// (`PR_SET_PDEATHSIG`), so that killing the tuner does not leave children
/// running: with no one reading their output they would otherwise hold
/// their memory (pinned RAM, VRAM) until they finish. The thread that
/// starts a child waits for it, so it outlives the child in a normal run.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before `exec` and calls
    // only `prctl` and `getppid`, both async-signal-safe; it allocates
    // nothing (`from_raw_os_error` builds an error without allocating).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died between `fork` and `prctl`, before
            // the death signal was armed.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

fn wait(child: &mut Child) -> Result<ExitStatus> {
    child
        .wait()
        .map_err(|e| Error::Pipeline(format!("waiting for the tuner child: {e}")))
}

/// Waits up to `timeout` for a child that closed its stdout; kills it after.
/// `None` when it had to be killed.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            Ok(None) if t0.elapsed() < timeout => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                wait(child)?;
                return Ok(None);
            }
            Err(e) => return Err(Error::Pipeline(format!("waiting for the tuner child: {e}"))),
        }
    }
}

/// Reads a child's stderr to the end, keeping the last few KB.
fn tail_of(mut r: impl Read, echo: bool) -> String {
    const KEEP: usize = 4096;
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if echo {
                    use std::io::Write;
                    let _ = std::io::stderr().write_all(&buf[..n]);
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * KEEP {
                    tail.drain(..tail.len() - KEEP);
                }
            }
        }
    }
    String::from_utf8_lossy(&tail).into_owned()
}

/// "signal 6 (SIGABRT): <last lines of stderr>" or "exit status 101: ...".
fn crash_reason(status: ExitStatus, stderr: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("signal {sig}{}", signal_name(sig)),
        (Some(0), None) => "exited without reporting its runs".to_string(),
        (Some(code), None) => format!("exit status {code}"),
        (None, None) => "ended".to_string(),
    };
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    let last = lines[lines.len().saturating_sub(2)..].join(" / ");
    if last.is_empty() {
        how
    } else {
        let short: String = last.chars().take(240).collect();
        let more = if short.len() < last.len() { "…" } else { "" };
        format!("{how}: {short}{more}")
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGABRT => " (SIGABRT)",
        libc::SIGSEGV => " (SIGSEGV)",
        libc::SIGBUS => " (SIGBUS)",
        libc::SIGKILL => " (SIGKILL)",
        libc::SIGTERM => " (SIGTERM)",
        libc::SIGILL => " (SIGILL)",
        libc::SIGFPE => " (SIGFPE)",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn crash_reasons_name_the_signal_and_the_message() {
        let r = crash_reason(
            ExitStatus::from_raw(libc::SIGABRT),
            "thread 'main' panicked at x.rs:1:1:\nboom\nnote: run with `RUST_BACKTRACE=1`\n",
        );
        assert_eq!(
            r,
            "signal 6 (SIGABRT): thread 'main' panicked at x.rs:1:1: / boom"
        );
        assert_eq!(
            crash_reason(ExitStatus::from_raw(3 << 8), ""),
            "exit status 3"
        );
    }
}
