//! The parent side of the tuner protocol: start one child per
//! configuration, read its lines as they come, and kill it when a measured
//! run is already slower than the best so far or when it stops reporting.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
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
    let json = serde_json::to_string(req)
        .map_err(|e| Error::Pipeline(format!("cannot serialize the child request: {e}")))?;
    let mut child = Command::new(&cmd.exe)
        .args(&cmd.args)
        .env(CHILD_ENV, "1")
        .env(REQUEST_ENV, json)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::io("starting the tuner child", &cmd.exe, None, e))?;
    let (tx, rx) = mpsc::channel::<Line>();
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

    let mut report = ChildReport {
        warmup_s: None,
        runs: Vec::new(),
        ending: Ending::Crashed(String::new()),
    };
    let mut error = None;
    let mut done = false;
    let mut last_line = Instant::now();
    let killed: Option<Ending> = loop {
        let wait = timeout.saturating_sub(last_line.elapsed());
        match rx.recv_timeout(wait) {
            Ok(Line::Run { run, seconds }) => {
                last_line = Instant::now();
                if run == 0 {
                    report.warmup_s = Some(seconds);
                    continue;
                }
                report.runs.push(seconds);
                if let Some(best_s) = kill_above.filter(|&b| seconds > b) {
                    break Some(Ending::Slower { best_s });
                }
            }
            Ok(Line::Done { .. }) => {
                // Every run is in: what the child does while exiting does
                // not change the measurement.
                last_line = Instant::now();
                done = true;
                break None;
            }
            Ok(Line::Error { error: e }) => {
                last_line = Instant::now();
                error = Some(e);
            }
            Err(RecvTimeoutError::Timeout) => break Some(Ending::TimedOut(timeout)),
            Err(RecvTimeoutError::Disconnected) => break None,
        }
    };
    let status = match killed {
        Some(_) => {
            // Ending an already-exited child is not an error: it may have
            // finished between the last line and this kill.
            let _ = child.kill();
            Some(wait(&mut child)?)
        }
        None => wait_with_timeout(&mut child, timeout.saturating_sub(last_line.elapsed()))?,
    };
    let _ = out_reader.join();
    let stderr_tail = err_reader.join().ok().flatten().unwrap_or_default();
    report.ending = match (killed, status) {
        (Some(k), _) => k,
        (None, _) if done => Ending::Finished,
        (None, None) => Ending::TimedOut(timeout),
        (None, Some(status)) => match error {
            Some(e) => Ending::Failed(e),
            None => Ending::Crashed(crash_reason(status, &stderr_tail)),
        },
    };
    Ok(report)
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
