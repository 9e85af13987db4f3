//! Commands that reach inside a running guest: logs, cp, exec.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vroom_client::Client;
use vroom_types::{CappedOutput, ExecEvent, ExecRequest, ExecResult};

use crate::output;

pub async fn copy_out(client: &Client, source: &str, dest: &Path) -> Result<()> {
    let Some((name, path)) = source
        .split_once(':')
        .filter(|(n, p)| !n.is_empty() && !p.is_empty())
    else {
        bail!("the source {source:?} must be NAME:/path/in/the/guest");
    };
    if dest == Path::new("-") {
        client
            .read_file_to(name, path, &mut tokio::io::stdout())
            .await?;
        return Ok(());
    }
    if path.ends_with('/') {
        return copy_dir_out(client, name, path, dest).await;
    }
    let target = if dest.is_dir() {
        let file = Path::new(path)
            .file_name()
            .with_context(|| format!("{path} names no file"))?;
        dest.join(file)
    } else {
        dest.to_path_buf()
    };
    copy_file_out(client, name, path, &target).await
}

/// `cp NAME:/dir/ LOCALDIR`: every regular file directly in the guest's
/// directory (not recursive), into `dest`, created if missing. The listing
/// comes from the guest's busybox `find`; each name is untrusted and must be
/// a plain file name (no `/`, not `.` or `..`).
async fn copy_dir_out(client: &Client, name: &str, dir: &str, dest: &Path) -> Result<()> {
    let listing = client
        .exec(
            name,
            &ExecRequest {
                argv: [
                    "/bin/busybox",
                    "find",
                    dir,
                    "-maxdepth",
                    "1",
                    "-type",
                    "f",
                    "-print0",
                ]
                .map(String::from)
                .to_vec(),
                timeout_secs: Some(30),
                stdin: false,
            },
        )
        .await?;
    if listing.exit_code != 0 {
        bail!(
            "cannot list {dir} in {name}: {}",
            listing.stderr.lines().next().unwrap_or("find failed")
        );
    }
    if listing.stdout_truncated {
        bail!("{dir} in {name} holds too many files to copy at once");
    }
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let mut copied = 0;
    for path in listing.stdout.split('\0').filter(|p| !p.is_empty()) {
        let file = path.strip_prefix(dir).unwrap_or(path);
        if file.is_empty() || file.contains('/') || file == "." || file == ".." {
            eprintln!("skipping {path:?}: not a plain file name");
            continue;
        }
        copy_file_out(client, name, path, &dest.join(file)).await?;
        copied += 1;
    }
    eprintln!(
        "copied {} from {name}:{dir} to {}",
        output::count(copied, "file", "files"),
        dest.display()
    );
    Ok(())
}

async fn copy_file_out(client: &Client, name: &str, path: &str, target: &Path) -> Result<()> {
    // Write beside the target and rename, so a failed copy leaves nothing half-written.
    let partial = target.with_extension("vroom-partial");
    let copied = async {
        let mut file = tokio::fs::File::create(&partial)
            .await
            .with_context(|| format!("cannot create {}", partial.display()))?;
        client.read_file_to(name, path, &mut file).await?;
        file.sync_all()
            .await
            .with_context(|| format!("cannot write {}", partial.display()))?;
        tokio::fs::rename(&partial, target)
            .await
            .with_context(|| format!("cannot write {}", target.display()))
    }
    .await;
    if copied.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    copied
}

pub async fn logs(
    client: &Client,
    name: &str,
    boot: i32,
    tail: Option<usize>,
    follow: bool,
) -> Result<()> {
    let mut offset = 0;
    let mut stdout = std::io::stdout();
    if let Some(lines) = tail {
        // Read to the end, keeping only the last lines.
        let mut kept = std::collections::VecDeque::with_capacity(lines + 1);
        let mut partial = String::new();
        loop {
            let chunk = client.boot_logs(name, boot, offset).await?;
            if chunk.next_offset == offset {
                break;
            }
            offset = chunk.next_offset;
            partial.push_str(&chunk.data);
            while let Some(end) = partial.find('\n') {
                let line: String = partial.drain(..=end).collect();
                kept.push_back(line);
                if kept.len() > lines {
                    kept.pop_front();
                }
            }
        }
        if !partial.is_empty() {
            kept.push_back(partial);
            if kept.len() > lines {
                kept.pop_front();
            }
        }
        for line in kept {
            stdout.write_all(line.as_bytes())?;
        }
        stdout.flush()?;
        if !follow {
            return Ok(());
        }
    }
    loop {
        let chunk = client.boot_logs(name, boot, offset).await?;
        stdout.write_all(chunk.data.as_bytes())?;
        stdout.flush()?;
        let got_data = chunk.next_offset != offset;
        offset = chunk.next_offset;
        if !got_data {
            if !follow {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// Streams a command's output to ours as it comes, feeding it our stdin
/// with `-i`; returns its exit code. `--json` prints the whole result at the end.
pub async fn exec(client: &Client, name: &str, req: &ExecRequest, json: bool) -> Result<i32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut events, input) = client.exec_stream(name, req).await?;
    if let Some(mut input) = input {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if input.write(buf[..n].to_vec().into()).await.is_err() {
                            break;
                        }
                    }
                }
            }
            // Dropping `input` ends the request body: the command's stdin closes.
        });
    }
    let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
    let (mut out_text, mut err_text) = (CappedOutput::default(), CappedOutput::default());
    while let Some(event) = events.next().await {
        match event? {
            ExecEvent::Stdout { data } if json => out_text.push(&data),
            ExecEvent::Stderr { data } if json => err_text.push(&data),
            ExecEvent::Stdout { data } => {
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
            ExecEvent::Stderr { data } => {
                stderr.write_all(&data).await?;
                stderr.flush().await?;
            }
            ExecEvent::Exit(exit) => {
                if json {
                    output::json(&ExecResult {
                        exit_code: exit.exit_code,
                        stdout: out_text.text(),
                        stderr: err_text.text(),
                        stdout_truncated: out_text.truncated(),
                        stderr_truncated: err_text.truncated(),
                        message: exit.message,
                    });
                } else if let Some(message) = &exit.message {
                    eprintln!("vroom exec: {message}");
                }
                return Ok(exit.exit_code);
            }
            ExecEvent::Error { error } => return Err(events.error(error).into()),
        }
    }
    Err(events.ended_early().into())
}
