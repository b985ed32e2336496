//! Prompt encoding from the text encoders alone (`TextEncoders`, what the
//! Diffusion-DPO stage loads) equals encoding through the whole pipeline.

use agfsync_diffusion::pipeline::{encode_prompts, Negative, TextConditioning, XlSizes};
use agfsync_models::hub::ModelSource;
use agfsync_models::stable_diffusion::{
    LoadOptions, PromptEncoders, SdFamily, StableDiffusion, TextEncoders,
};
use agfsync_models::tiny::{write_tiny_sd_pipeline, TinyPreset};
use anyhow::Result;
use candle_core::Tensor;

fn same(a: &Tensor, b: &Tensor) -> Result<()> {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    assert_eq!(d, 0.0);
    Ok(())
}

fn encode(
    sd: &(impl PromptEncoders + ?Sized),
    prompts: &[String],
    negative: Negative,
) -> Result<TextConditioning> {
    let xl = (sd.family() == SdFamily::Xl).then(|| XlSizes::for_image(64, 64));
    Ok(encode_prompts(sd, prompts, negative, None, xl.as_ref())?.0)
}

#[test]
fn text_encoders_alone_encode_as_the_whole_pipeline() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let prompts = vec!["a red cube".to_string(), "two cats on a sofa".to_string()];
    for preset in [TinyPreset::Sd15, TinyPreset::Sd2, TinyPreset::Sdxl] {
        let dir = tmp.path().join(format!("{preset:?}"));
        write_tiny_sd_pipeline(&dir, preset, 3)?;
        let src = ModelSource::local(&dir);
        let opts = LoadOptions::default();
        let full = StableDiffusion::load(&src, &opts)?;
        let text = TextEncoders::load(&src, &opts)?;
        assert_eq!(full.family, text.family, "{preset:?}");
        for negative in [Negative::None, Negative::Default] {
            let a = encode(&full, &prompts, negative)?;
            let b = encode(&text, &prompts, negative)?;
            same(&a.cond, &b.cond)?;
            match (&a.uncond, &b.uncond) {
                (Some(x), Some(y)) => same(x, y)?,
                (None, None) => {}
                _ => panic!("{preset:?}: one side has negative embeddings"),
            }
            match (&a.added, &b.added) {
                (Some((x, xu)), Some((y, yu))) => {
                    same(&x.text_embeds, &y.text_embeds)?;
                    same(&x.time_ids, &y.time_ids)?;
                    same(&xu.text_embeds, &yu.text_embeds)?;
                }
                (None, None) => assert_ne!(preset, TinyPreset::Sdxl),
                _ => panic!("{preset:?}: one side has SDXL conditioning"),
            }
        }
    }
    Ok(())
}
