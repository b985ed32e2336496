//! Sentence embeddings for near-duplicate removal: the [`Embedder`] trait
//! (the real BERT-family embedder, bge-large-en-v1.5 in the original, is
//! `bert_embed::BertEmbedder` with the feature `local`) and a bag-of-words
//! embedder for tests.

use crate::error::{AuthorError, Result};

/// Turns texts into L2-normalised vectors, so that a dot product is the
/// cosine similarity.
pub trait Embedder {
    /// One unit-length vector per text, all of the same dimension (an
    /// empty text may give the zero vector).
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>>;

    /// A stable description of the model for provenance records.
    fn identity(&self) -> String;
}

/// Cosine similarity of two L2-normalised vectors (their dot product);
/// vectors of different lengths compare as 0.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Indices of the texts to keep, in order: a text is dropped when its
/// cosine to an earlier kept text is `>= threshold` (AGFSync's rule: 0.90
/// for prompts, 0.8 for questions).
pub fn dedup_indices(vectors: &[Vec<f32>], threshold: f32) -> Vec<usize> {
    let mut kept: Vec<usize> = Vec::new();
    for (i, v) in vectors.iter().enumerate() {
        if !kept.iter().any(|&k| cosine(&vectors[k], v) >= threshold) {
            kept.push(i);
        }
    }
    kept
}

/// Embeds `texts` and checks what came back (count, dimension, norm), so a
/// faulty embedder is reported rather than silently keeping everything.
pub(crate) fn embed_checked<E: Embedder + ?Sized>(
    embedder: &E,
    texts: &[String],
) -> Result<Vec<Vec<f32>>> {
    if texts.is_empty() {
        return Ok(Vec::new());
    }
    let vectors = embedder.embed(texts)?;
    if vectors.len() != texts.len() {
        return Err(AuthorError::Embed(format!(
            "{}: {} vectors for {} texts",
            embedder.identity(),
            vectors.len(),
            texts.len()
        )));
    }
    let dim = vectors[0].len();
    for v in &vectors {
        if v.len() != dim {
            return Err(AuthorError::Embed(format!(
                "{}: vectors of dimension {dim} and {}",
                embedder.identity(),
                v.len()
            )));
        }
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if !(norm == 0.0 || (norm - 1.0).abs() < 1e-3) {
            return Err(AuthorError::Embed(format!(
                "{}: a vector has norm {norm}, not 1 (embeddings must be L2-normalised)",
                embedder.identity()
            )));
        }
    }
    Ok(vectors)
}

/// A deterministic bag-of-words embedder for tests: lower-cased words
/// hashed (FNV-1a) into `dim` buckets, counted, L2-normalised. Texts with
/// the same words in any order embed identically.
#[derive(Clone, Debug)]
pub struct BagOfWords {
    dim: usize,
}

impl BagOfWords {
    /// An embedder with `dim` buckets (at least 1).
    pub fn new(dim: usize) -> Self {
        Self { dim: dim.max(1) }
    }
}

impl Default for BagOfWords {
    fn default() -> Self {
        Self::new(512)
    }
}

impl Embedder for BagOfWords {
    fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0f32; self.dim];
                for word in t
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|w| !w.is_empty())
                {
                    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                    for b in word.to_lowercase().bytes() {
                        h ^= u64::from(b);
                        h = h.wrapping_mul(0x0100_0000_01b3);
                    }
                    v[(h % self.dim as u64) as usize] += 1.0;
                }
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x /= norm);
                }
                v
            })
            .collect())
    }

    fn identity(&self) -> String {
        format!("bag-of-words:{}", self.dim)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;

    #[test]
    fn bag_of_words_is_normalised_and_order_free() {
        let e = BagOfWords::default();
        let v = e
            .embed(&["a red fox".into(), "fox red a".into(), "".into()])
            .unwrap();
        assert!((cosine(&v[0], &v[0]) - 1.0).abs() < 1e-6);
        assert!((cosine(&v[0], &v[1]) - 1.0).abs() < 1e-6);
        assert_eq!(cosine(&v[0], &v[2]), 0.0);
    }

    #[test]
    fn dedup_keeps_first_of_near_duplicates() {
        let e = BagOfWords::default();
        let texts: Vec<String> = [
            "a red fox in snow",
            "a blue car on a road",
            "A red fox in snow!",
            "a red fox sleeping in fresh snow",
        ]
        .map(String::from)
        .to_vec();
        let v = e.embed(&texts).unwrap();
        assert_eq!(dedup_indices(&v, 0.9), vec![0, 1, 3]);
        assert_eq!(dedup_indices(&v, 0.8), vec![0, 1]);
    }

    #[test]
    fn faulty_embedder_is_reported() {
        struct Bad;
        impl Embedder for Bad {
            fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
                Ok(texts.iter().map(|_| vec![2.0, 0.0]).collect())
            }
            fn identity(&self) -> String {
                "bad".into()
            }
        }
        let e = embed_checked(&Bad, &["x".into()]).unwrap_err().to_string();
        assert!(e.contains("norm"), "{e}");
    }
}
