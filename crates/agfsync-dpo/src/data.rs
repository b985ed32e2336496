//! Preference pairs in latent space and their deterministic order.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use rand::seq::SliceRandom;

use agfsync_diffusion::rng::Generator;

use crate::error::DpoError;

/// SDXL's added conditioning per pair (pooled text embeddings `[N, d]`,
/// time ids `[N, 6]`): the UNet's own type.
pub use agfsync_models::unet_2d_condition::AddedCondition as AddedCond;

/// `N` preference pairs: winner and loser latents (already scaled by the
/// VAE's scaling factor), the prompt's text embeddings and, for SDXL, the
/// added conditioning.
#[derive(Clone, Debug)]
pub struct PairDataset {
    /// Winner latents, `[N, C, H, W]`.
    pub latents_w: Tensor,
    /// Loser latents, `[N, C, H, W]`.
    pub latents_l: Tensor,
    /// Text embeddings, `[N, seq, d]` (77 tokens for Stable Diffusion).
    pub prompt_embeds: Tensor,
    /// SDXL's added conditioning.
    pub added: Option<AddedCond>,
    /// Where the pairs came from (for messages; empty when built in memory).
    pub source: PathBuf,
}

impl PairDataset {
    /// Checks shapes and builds a data set from tensors.
    pub fn new(
        latents_w: Tensor,
        latents_l: Tensor,
        prompt_embeds: Tensor,
        added: Option<AddedCond>,
    ) -> Result<Self, DpoError> {
        let ds = Self {
            latents_w,
            latents_l,
            prompt_embeds,
            added,
            source: PathBuf::new(),
        };
        ds.validate()?;
        Ok(ds)
    }

    fn bad(&self, reason: String) -> DpoError {
        DpoError::Data {
            path: self.source.clone(),
            reason,
        }
    }

    fn validate(&self) -> Result<(), DpoError> {
        let w = self.latents_w.dims();
        if w.len() != 4 {
            return Err(self.bad(format!("latents_w must be [N, C, H, W], got {w:?}")));
        }
        if self.latents_l.dims() != w {
            return Err(self.bad(format!(
                "latents_l has shape {:?} but latents_w {w:?}",
                self.latents_l.dims()
            )));
        }
        let n = w[0];
        if n == 0 {
            return Err(self.bad("the data set holds no pairs".into()));
        }
        let e = self.prompt_embeds.dims();
        if e.len() != 3 || e[0] != n {
            return Err(self.bad(format!("prompt_embeds must be [{n}, seq, d], got {e:?}")));
        }
        if let Some(a) = &self.added {
            if a.text_embeds.dims().first() != Some(&n) || a.time_ids.dims() != [n, 6] {
                return Err(self.bad(format!(
                    "add_text_embeds {:?} / add_time_ids {:?} must have {n} rows (time ids [N, 6])",
                    a.text_embeds.dims(),
                    a.time_ids.dims()
                )));
            }
        }
        Ok(())
    }

    /// Reads a safetensors file with `latents_w`, `latents_l`,
    /// `prompt_embeds` and optionally `add_text_embeds` + `add_time_ids`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, DpoError> {
        let mut t = crate::safetensors_io::read_safetensors(path, device)?;
        let mut take = |k: &str| {
            t.remove(k).ok_or_else(|| DpoError::Data {
                path: path.to_path_buf(),
                reason: format!(
                    "no tensor `{k}` (expected latents_w, latents_l, prompt_embeds, optionally add_text_embeds and add_time_ids)"
                ),
            })
        };
        let latents_w = take("latents_w")?;
        let latents_l = take("latents_l")?;
        let prompt_embeds = take("prompt_embeds")?;
        let added = match (take("add_text_embeds"), take("add_time_ids")) {
            (Ok(text_embeds), Ok(time_ids)) => Some(AddedCond {
                text_embeds,
                time_ids,
            }),
            _ => None,
        };
        let ds = Self {
            latents_w,
            latents_l,
            prompt_embeds,
            added,
            source: path.to_path_buf(),
        };
        ds.validate()?;
        Ok(ds)
    }

    /// Writes the data set as a pairs file that [`PairDataset::load`] reads
    /// (`latents_w`, `latents_l`, `prompt_embeds` and, for SDXL,
    /// `add_text_embeds` + `add_time_ids`), through a temporary file and a
    /// rename, so a crash never leaves a half-written file at `path`.
    pub fn save(&self, path: &Path) -> Result<(), DpoError> {
        let mut t = std::collections::HashMap::new();
        t.insert("latents_w".to_string(), self.latents_w.clone());
        t.insert("latents_l".to_string(), self.latents_l.clone());
        t.insert("prompt_embeds".to_string(), self.prompt_embeds.clone());
        if let Some(a) = &self.added {
            t.insert("add_text_embeds".to_string(), a.text_embeds.clone());
            t.insert("add_time_ids".to_string(), a.time_ids.clone());
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        crate::safetensors_io::write_safetensors(&tmp, &t, &Default::default())?;
        std::fs::rename(&tmp, path).map_err(|e| DpoError::io(path, e))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.latents_w.dims()[0]
    }

    /// Always false (an empty data set is refused).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape `[C, H, W]` of one latent.
    pub fn latent_shape(&self) -> (usize, usize, usize) {
        let d = self.latents_w.dims();
        (d[1], d[2], d[3])
    }

    /// The order of the pairs in `epoch`: a permutation drawn from `seed`
    /// and the epoch number alone, so it never depends on the run's history.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        let mut rng = Generator::new(mix(seed, 0x5eed_da7a, epoch));
        order.shuffle(&mut rng);
        order
    }

    /// The indices of the `count` pairs starting at global position `pos`
    /// (pairs consumed so far across epochs).
    pub fn indices(&self, seed: u64, pos: u64, count: usize) -> Vec<usize> {
        let n = self.len() as u64;
        let mut out = Vec::with_capacity(count);
        let mut cached: Option<(u64, Vec<usize>)> = None;
        for k in pos..pos + count as u64 {
            let epoch = k / n;
            if cached.as_ref().map(|c| c.0) != Some(epoch) {
                cached = Some((epoch, self.epoch_order(seed, epoch)));
            }
            if let Some((_, order)) = &cached {
                out.push(order[(k % n) as usize]);
            }
        }
        out
    }

    /// The batch of pairs at `indices`, on `device` as `dtype`.
    pub fn batch(
        &self,
        indices: &[usize],
        device: &Device,
        dtype: DType,
    ) -> Result<Batch, DpoError> {
        let pick = |t: &Tensor| -> Result<Tensor, DpoError> {
            let rows = indices
                .iter()
                .map(|&i| t.i(i..i + 1))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(Tensor::cat(&rows, 0)?.to_device(device)?)
        };
        Ok(Batch {
            latents_w: pick(&self.latents_w)?.to_dtype(dtype)?,
            latents_l: pick(&self.latents_l)?.to_dtype(dtype)?,
            prompt_embeds: pick(&self.prompt_embeds)?.to_dtype(dtype)?,
            added: match &self.added {
                Some(a) => Some(AddedCond {
                    text_embeds: pick(&a.text_embeds)?.to_dtype(dtype)?,
                    time_ids: pick(&a.time_ids)?.to_dtype(dtype)?,
                }),
                None => None,
            },
        })
    }
}

/// One batch of pairs.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[b, C, H, W]`.
    pub latents_w: Tensor,
    /// `[b, C, H, W]`.
    pub latents_l: Tensor,
    /// `[b, seq, d]`.
    pub prompt_embeds: Tensor,
    /// SDXL's added conditioning, `[b, ...]`.
    pub added: Option<AddedCond>,
}

impl Batch {
    /// The text conditioning repeated for winners then losers, which the
    /// trainer stacks into one UNet batch: `([2b, seq, d], added [2b, ...])`.
    pub fn doubled_condition(&self) -> candle_core::Result<(Tensor, Option<AddedCond>)> {
        let twice = |t: &Tensor| Tensor::cat(&[t, t], 0);
        let added = match &self.added {
            Some(a) => Some(AddedCond {
                text_embeds: twice(&a.text_embeds)?,
                time_ids: twice(&a.time_ids)?,
            }),
            None => None,
        };
        Ok((twice(&self.prompt_embeds)?, added))
    }
}

/// Mixes a seed with a stream tag and a counter into a generator seed
/// (SplitMix64 finalizer), so every micro-batch draws from its own stream.
pub fn mix(seed: u64, tag: u64, counter: u64) -> u64 {
    let mut z = seed
        .wrapping_add(tag.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_add(counter.wrapping_mul(0xd1b5_4a32_d192_ed03));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
