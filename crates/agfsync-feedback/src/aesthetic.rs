//! The LAION "improved aesthetic predictor" (Schuhmann, LAION-Aesthetics
//! V2, 2022; github.com/christophschuhmann/improved-aesthetic-predictor):
//! an MLP on the L2-normalised CLIP ViT-L/14 image embedding, trained to
//! predict 1..10 ratings (`sac+logos+ava1-l14-linearMSE.pth`).
//!
//! Layout (`MLP.layers`, an `nn.Sequential`): Linear 768-1024, Dropout 0.2,
//! Linear 1024-128, Dropout 0.2, Linear 128-64, Dropout 0.1, Linear 64-16,
//! Linear 16-1; no activations. Weights are keyed `layers.{0,2,4,6,7}.
//! {weight,bias}`. The widths are read from the file, so heads trained on
//! other CLIP models (or the tiny test heads) load too; the input width must
//! equal the CLIP model's projection width.
//!
//! Input: LAION's `normalized(image_features)`, numpy's `x / ||x||` with a
//! zero norm replaced by 1. The head loads from safetensors or from the
//! original `.pth` (`torch.save(model.state_dict())`), read without running
//! any pickled code (see [`crate::pth`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::clip::{files_fingerprint, ClipModel};
use crate::error::{FeedbackError, Result};
use crate::image_input::LoadedImage;
use crate::pth::{looks_like_pth, read_pth_state_dict};
use crate::scorer::{l2_normalise, BatchCache, ImageOutcome, ScoreRequest, ScoreResult, Scorer};

/// Version of the aesthetic score computation; bump when it changes.
pub const AESTHETIC_VERSION: &str = "laion-aesthetic/1 mlp(l2norm(clip_image_embeds))";

/// The `nn.Sequential` indices of the head's linear layers.
const LAYERS: [usize; 5] = [0, 2, 4, 6, 7];

/// The aesthetic MLP head.
#[derive(Clone, Debug)]
pub struct AestheticHead {
    /// `(weight [out, in], bias [out])` of each linear layer, f32.
    layers: Vec<(Tensor, Tensor)>,
    path: PathBuf,
    identity: String,
}

impl AestheticHead {
    /// Loads a head from a `.safetensors` or a torch `.pth` file (told apart
    /// by content, not by extension).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let tensors: HashMap<String, Tensor> = if looks_like_pth(path) {
            read_pth_state_dict(path)?.into_iter().collect()
        } else {
            if let Err(source) = std::fs::metadata(path) {
                return Err(FeedbackError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
                FeedbackError::Weights {
                    path: path.to_path_buf(),
                    reason: format!(
                        "neither a torch .pth (zip) nor a readable safetensors file: {e}"
                    ),
                }
            })?
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let identity = format!("{name}#{}", files_fingerprint(&[path.to_path_buf()]));
        Self::from_tensors(&tensors, path, &identity, device)
    }

    /// Builds a head from its state dict; `path` and `identity` name it in
    /// errors and versions.
    pub fn from_tensors(
        tensors: &HashMap<String, Tensor>,
        path: &Path,
        identity: &str,
        device: &Device,
    ) -> Result<Self> {
        let err = |reason: String| FeedbackError::Weights {
            path: path.to_path_buf(),
            reason,
        };
        let mut layers = Vec::with_capacity(LAYERS.len());
        let mut prev_out: Option<usize> = None;
        for (n, &i) in LAYERS.iter().enumerate() {
            let get = |what: &str| -> Result<Tensor> {
                let key = format!("layers.{i}.{what}");
                let t = tensors.get(&key).ok_or_else(|| {
                    let mut keys: Vec<&String> = tensors.keys().collect();
                    keys.sort();
                    err(format!(
                        "missing `{key}`: not a LAION aesthetic head (expected layers.0/2/4/6/7 \
                         weights and biases; found {keys:?})"
                    ))
                })?;
                Ok(t.to_dtype(DType::F32)?.to_device(device)?)
            };
            let w = get("weight")?;
            let b = get("bias")?;
            let (out, inp) = w.dims2().map_err(|_| {
                err(format!(
                    "`layers.{i}.weight` has shape {:?}, expected 2 dims",
                    w.dims()
                ))
            })?;
            if b.dims() != [out] {
                return Err(err(format!(
                    "`layers.{i}.bias` has shape {:?}, expected [{out}]",
                    b.dims()
                )));
            }
            if let Some(p) = prev_out {
                if p != inp {
                    return Err(err(format!(
                        "`layers.{i}.weight` takes {inp} inputs but the previous layer gives {p}"
                    )));
                }
            }
            if n == LAYERS.len() - 1 && out != 1 {
                return Err(err(format!(
                    "the last layer `layers.{i}` has {out} outputs, expected 1"
                )));
            }
            prev_out = Some(out);
            layers.push((w, b));
        }
        Ok(Self {
            layers,
            path: path.to_path_buf(),
            identity: identity.to_string(),
        })
    }

    /// Width of the embeddings the head takes (768 for the LAION head).
    pub fn input_width(&self) -> usize {
        self.layers.first().map(|(w, _)| w.dims()[1]).unwrap_or(0)
    }

    /// The file the head came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's name and a fingerprint of its size and first bytes.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Errors unless the head takes `clip_width`-wide embeddings.
    pub fn check_width(&self, clip_width: usize, clip: &str) -> Result<()> {
        if self.input_width() != clip_width {
            return Err(FeedbackError::WidthMismatch {
                path: self.path.clone(),
                head_width: self.input_width(),
                clip: clip.to_string(),
                clip_width,
            });
        }
        Ok(())
    }

    /// Scores of already L2-normalised embeddings `[b, width]`: `[b]`.
    pub fn forward(&self, normalised: &Tensor) -> Result<Tensor> {
        let mut x = normalised.to_dtype(DType::F32)?;
        for (w, b) in &self.layers {
            x = x.matmul(&w.t()?)?.broadcast_add(b)?;
        }
        Ok(x.squeeze(1)?)
    }

    /// Scores of raw (unnormalised) CLIP image embeddings `[b, width]`.
    pub fn score_embeddings(&self, image_embeds: &Tensor) -> Result<Tensor> {
        self.forward(&l2_normalise(&image_embeds.to_dtype(DType::F32)?)?)
    }
}

/// The aesthetic score metric: a CLIP ViT-L/14 image embedding through the
/// LAION head.
#[derive(Debug)]
pub struct AestheticScorer {
    clip: Arc<ClipModel>,
    head: AestheticHead,
    version: String,
    batch_size: usize,
}

impl AestheticScorer {
    /// Pairs a head with the CLIP model it was trained on; a head whose
    /// input width differs from the model's embedding width is an error
    /// naming both.
    pub fn new(clip: Arc<ClipModel>, head: AestheticHead) -> Result<Self> {
        head.check_width(clip.projection_dim(), clip.identity())?;
        let version = format!(
            "{AESTHETIC_VERSION}; head={}; clip={}; preprocess=transformers-{}",
            head.identity(),
            clip.identity(),
            clip.processor().backend().name()
        );
        Ok(Self {
            clip,
            head,
            version,
            batch_size: 8,
        })
    }

    /// Sets the preferred batch size.
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The head.
    pub fn head(&self) -> &AestheticHead {
        &self.head
    }
}

impl Scorer for AestheticScorer {
    fn name(&self) -> &str {
        "aesthetic"
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn preferred_batch_size(&self) -> usize {
        self.batch_size
    }

    fn score_batch(
        &self,
        images: &[&LoadedImage],
        _request: &ScoreRequest<'_>,
        cache: &mut BatchCache,
    ) -> Result<Vec<ImageOutcome>> {
        let rows = self.clip.encode_images(images, Some(cache))?;
        let ok: Vec<Tensor> = rows
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        let scores: Vec<f32> = if ok.is_empty() {
            Vec::new()
        } else {
            let x = Tensor::stack(&ok, 0)?.to_device(&Device::Cpu)?;
            let head_device = self.head.layers[0].0.device().clone();
            self.head
                .score_embeddings(&x.to_device(&head_device)?)?
                .to_device(&Device::Cpu)?
                .to_vec1()?
        };
        let mut next = scores.into_iter();
        Ok(rows
            .into_iter()
            .zip(images)
            .map(|(row, img)| match row {
                Ok(_) => Ok(ScoreResult {
                    metric: "aesthetic".into(),
                    value: f64::from(next.next().unwrap_or(f32::NAN)),
                    version: self.version.clone(),
                    details: Default::default(),
                    notes: Vec::new(),
                }),
                Err(reason) => Err(FeedbackError::Image {
                    path: img.path.clone(),
                    reason,
                }),
            })
            .collect())
    }
}
