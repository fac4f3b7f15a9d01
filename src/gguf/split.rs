//! Finding a model's GGUF files: one file, a split set
//! (`<prefix>-00001-of-00003.gguf`, ...), or a directory holding either.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The file name of part `no` (1-based) of `count` of a split model, as
/// llama.cpp's `gguf-split` names them: `<prefix>-00001-of-00003.gguf`.
pub fn split_name(prefix: &str, no: u32, count: u32) -> String {
    format!("{prefix}-{no:05}-of-{count:05}.gguf")
}

/// `(prefix, no, count)` of a split part's file name.
fn parse_split_name(name: &str) -> Option<(&str, u32, u32)> {
    let stem = name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(no) || !digits(count) || prefix.is_empty() {
        return None;
    }
    let (no, count): (u32, u32) = (no.parse().ok()?, count.parse().ok()?);
    (1..=count).contains(&no).then_some((prefix, no, count))
}

/// The files of the GGUF model at `path`, in order: the file itself; every
/// part of its split set when its name is one part's; or, for a directory,
/// its one `.gguf` file or its one split set. A missing part or a directory
/// with other GGUF files is an error naming them.
pub fn gguf_parts(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        return parts_in_dir(path);
    }
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some((prefix, _, count)) = parse_split_name(name) else {
        if !path.is_file() {
            return Err(Error::model(path, "no such GGUF file"));
        }
        return Ok(vec![path.to_path_buf()]);
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let parts: Vec<PathBuf> = (1..=count)
        .map(|no| dir.join(split_name(prefix, no, count)))
        .collect();
    if let Some(missing) = parts.iter().find(|p| !p.is_file()) {
        return Err(Error::model(
            missing,
            format!("part of the split model {name} is missing"),
        ));
    }
    Ok(parts)
}

fn parts_in_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, None, e))?;
    let mut names = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("listing", dir, None, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".gguf") && entry.path().is_file() {
            names.push(name);
        }
    }
    names.sort();
    let first = match names.as_slice() {
        [] => return Err(Error::model(dir, "no .gguf file in the directory")),
        [one] => one.clone(),
        many => {
            // Several files: they must be exactly one split set.
            let set = parse_split_name(&many[0]).map(|(p, _, c)| (p.to_string(), c));
            let complete = set.as_ref().is_some_and(|(prefix, count)| {
                many.len() == *count as usize
                    && many
                        .iter()
                        .zip(1..)
                        .all(|(n, no)| *n == split_name(prefix, no, *count))
            });
            if !complete {
                return Err(Error::model(
                    dir,
                    format!(
                        "holds several GGUF files that are not one split set: {}",
                        many.join(", ")
                    ),
                ));
            }
            many[0].clone()
        }
    };
    gguf_parts(&dir.join(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_parse_and_format() {
        assert_eq!(
            parse_split_name("m-q4-00002-of-00003.gguf"),
            Some(("m-q4", 2, 3))
        );
        assert_eq!(split_name("m-q4", 2, 3), "m-q4-00002-of-00003.gguf");
        for bad in [
            "m.gguf",
            "m-00004-of-00003.gguf",
            "m-00000-of-00003.gguf",
            "m-1-of-3.gguf",
            "-00001-of-00001.gguf",
        ] {
            assert_eq!(parse_split_name(bad), None, "{bad}");
        }
    }
}
