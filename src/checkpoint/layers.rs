//! The repeated block structure and each block's read plan.

use std::collections::{BTreeSet, HashMap};

use super::{Layer, LayerTensor, ReadOp, ShardFile, TensorInfo, READ_ALIGN};
use crate::io::{align_down, align_up};
use crate::{Error, Result};

/// The name pattern of a model's layers: `<prefix>.<i>.<key>` for `i` in `0..num_layers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerStructure {
    /// E.g. `model.layers`.
    pub prefix: String,
    /// Number of layers.
    pub num_layers: usize,
    /// Only these keys belong to the layers (other tensors under the prefix
    /// are static); `None`: every key does.
    pub keys: Option<Vec<String>>,
}

impl LayerStructure {
    /// Splits a tensor name into (layer index, key) if it belongs to a layer.
    pub fn split<'a>(&self, name: &'a str) -> Option<(usize, &'a str)> {
        let rest = name.strip_prefix(self.prefix.as_str())?.strip_prefix('.')?;
        let (idx, key) = rest.split_once('.')?;
        let i = parse_index(idx)?;
        let known = self
            .keys
            .as_ref()
            .is_none_or(|ks| ks.iter().any(|k| k == key));
        (i < self.num_layers && !key.is_empty() && known).then_some((i, key))
    }
}

/// A decimal layer index without sign or leading zeros.
fn parse_index(s: &str) -> Option<usize> {
    let plain =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if plain {
        s.parse().ok()
    } else {
        None
    }
}

#[derive(Default)]
struct Candidate {
    indices: BTreeSet<usize>,
    bytes: u64,
    tensors: usize,
}

/// Finds the repeated block structure among `(name, bytes)` pairs: of every
/// name pattern `<prefix>.<i>.<key>` seen with at least two indices, the
/// prefix covering the most bytes (then the most tensors, then the shortest).
/// Its indices must run exactly `0..L`; a missing one is an error naming it.
pub fn discover_layers<'a>(
    tensors: impl IntoIterator<Item = (&'a str, u64)>,
) -> std::result::Result<LayerStructure, String> {
    let mut candidates: HashMap<&str, Candidate> = HashMap::new();
    let mut count = 0usize;
    for (name, bytes) in tensors {
        count += 1;
        // Every dot-separated component that is a number, with something on
        // both sides, is a possible layer index.
        for (pos, _) in name.match_indices('.') {
            if pos == 0 {
                continue;
            }
            let comp_start = pos + 1;
            let comp_end = name[comp_start..].find('.').map(|e| comp_start + e);
            let Some(comp_end) = comp_end else { break };
            if let Some(i) = parse_index(&name[comp_start..comp_end]) {
                if comp_end + 1 < name.len() {
                    let c = candidates.entry(&name[..pos]).or_default();
                    c.indices.insert(i);
                    c.bytes = c.bytes.saturating_add(bytes);
                    c.tensors += 1;
                }
            }
        }
    }
    let best = candidates
        .into_iter()
        .filter(|(_, c)| c.indices.len() >= 2)
        .max_by(|(pa, a), (pb, b)| {
            (
                a.bytes,
                a.tensors,
                std::cmp::Reverse(pa.len()),
                std::cmp::Reverse(*pa),
            )
                .cmp(&(
                    b.bytes,
                    b.tensors,
                    std::cmp::Reverse(pb.len()),
                    std::cmp::Reverse(*pb),
                ))
        });
    let Some((prefix, c)) = best else {
        return Err(format!(
            "no repeated layer structure: none of the {count} tensor names has the form \
             <prefix>.<i>.<key> for two or more layer indices i"
        ));
    };
    let last = *c.indices.last().unwrap_or(&0);
    if let Some(missing) = (0..=last).find(|i| !c.indices.contains(i)) {
        return Err(format!(
            "layer {prefix}.{missing} is missing: the layers under {prefix} run from {} to {last} \
             with {} of them present",
            c.indices.first().unwrap_or(&0),
            c.indices.len()
        ));
    }
    Ok(LayerStructure {
        prefix: prefix.to_string(),
        num_layers: last + 1,
        keys: None,
    })
}

/// Plans the reads of one layer from its tensors' extents `(file, absolute
/// offset, len)`, in any order. Each extent is widened to [`READ_ALIGN`];
/// extents of one file whose widened ranges touch or overlap share a read;
/// reads are packed into the slot one after another. Returns the reads (in
/// file order) and, for each input extent, its offset inside the slot.
pub fn plan_reads(extents: &[(usize, u64, u64)]) -> (Vec<ReadOp>, Vec<u64>) {
    let mut order: Vec<usize> = (0..extents.len()).collect();
    order.sort_by_key(|&i| (extents[i].0, extents[i].1, extents[i].2));
    let mut reads: Vec<ReadOp> = Vec::new();
    let mut slot_offsets = vec![0u64; extents.len()];
    let mut which = vec![0usize; extents.len()];
    for &i in &order {
        let (file, off, len) = extents[i];
        let end = off.saturating_add(len);
        let a_start = align_down(off, READ_ALIGN);
        let a_end = align_up(end, READ_ALIGN).unwrap_or(align_down(u64::MAX, READ_ALIGN));
        match reads.last_mut() {
            Some(r) if r.file == file && a_start <= r.file_offset + r.len => {
                let new_end = (r.file_offset + r.len).max(a_end);
                r.len = new_end - r.file_offset;
                r.required_end = r.required_end.max(end);
            }
            _ => {
                let slot_offset = reads.last().map_or(0, |r| r.slot_offset + r.len);
                reads.push(ReadOp {
                    file,
                    file_offset: a_start,
                    len: a_end - a_start,
                    slot_offset,
                    required_end: end,
                });
            }
        }
        which[i] = reads.len() - 1;
    }
    // Slot offsets only once every read is final: later extents may grow a read
    // but never move its start.
    for i in 0..extents.len() {
        let r = &reads[which[i]];
        slot_offsets[i] = r.slot_offset + (extents[i].1 - r.file_offset);
    }
    (reads, slot_offsets)
}

/// Splits tensors into layers and statics and plans every layer's reads.
pub(super) fn build_layers(
    files: &[ShardFile],
    tensors: Vec<TensorInfo>,
    structure: &LayerStructure,
) -> Result<(Vec<Layer>, Vec<TensorInfo>)> {
    let mut per_layer: Vec<Vec<(String, TensorInfo)>> = vec![Vec::new(); structure.num_layers];
    let mut statics = Vec::new();
    for t in tensors {
        match structure.split(&t.name) {
            Some((i, key)) => per_layer[i].push((key.to_string(), t)),
            None => statics.push(t),
        }
    }
    statics.sort_by_key(|t| (t.file, t.file_offset));
    let mut layers = Vec::with_capacity(per_layer.len());
    for (index, mut ts) in per_layer.into_iter().enumerate() {
        if ts.is_empty() {
            let dir = files
                .first()
                .and_then(|f| f.path.parent())
                .unwrap_or(std::path::Path::new("."));
            return Err(Error::model(
                dir,
                format!("layer {}.{index} has no tensors", structure.prefix),
            ));
        }
        ts.sort_by_key(|(_, t)| (t.file, t.file_offset));
        let extents: Vec<(usize, u64, u64)> = ts
            .iter()
            .map(|(_, t)| (t.file, t.file_offset, t.len))
            .collect();
        let (reads, slots) = plan_reads(&extents);
        let tensors: Vec<LayerTensor> = ts
            .into_iter()
            .zip(slots)
            .map(|((key, info), slot_offset)| LayerTensor {
                key,
                info,
                slot_offset,
            })
            .collect();
        layers.push(Layer {
            index,
            data_bytes: tensors.iter().map(|t| t.info.len).sum(),
            slot_bytes: reads.iter().map(|r| r.len).sum(),
            tensors,
            reads,
        });
    }
    Ok((layers, statics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_prefix_covering_most_bytes() {
        let names = [
            ("model.embed_tokens.weight", 1000),
            ("model.layers.0.mlp.experts.0.w1", 10),
            ("model.layers.0.mlp.experts.1.w1", 10),
            ("model.layers.1.mlp.experts.0.w1", 10),
            ("model.layers.1.mlp.experts.1.w1", 10),
            ("vision.blocks.0.w", 5),
            ("vision.blocks.1.w", 5),
        ];
        let s = discover_layers(names.iter().map(|(n, b)| (*n, *b as u64))).unwrap();
        assert_eq!(
            s,
            LayerStructure {
                prefix: "model.layers".into(),
                num_layers: 2,
                keys: None
            }
        );
        assert_eq!(
            s.split("model.layers.1.mlp.experts.0.w1"),
            Some((1, "mlp.experts.0.w1"))
        );
        assert_eq!(s.split("model.layers.01.x"), None);
        assert_eq!(s.split("model.layers.2.x"), None);
    }

    #[test]
    fn a_gap_names_the_missing_layer() {
        let names = [("h.0.w", 1u64), ("h.1.w", 1), ("h.3.w", 1)];
        let e = discover_layers(names.iter().copied()).unwrap_err();
        assert!(e.contains("layer h.2 is missing"), "{e}");
    }

    #[test]
    fn contiguous_tensors_are_one_read() {
        let (reads, slots) = plan_reads(&[(0, 5000, 100), (0, 5100, 9000), (0, 14100, 3)]);
        assert_eq!(reads.len(), 1);
        assert_eq!(
            reads[0],
            ReadOp {
                file: 0,
                file_offset: 4096,
                len: 12288,
                slot_offset: 0,
                required_end: 14103
            }
        );
        assert_eq!(slots, vec![904, 1004, 10004]);
    }
}
