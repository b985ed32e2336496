//! Model configs: diffusers / transformers / open_clip `config.json` files
//! and scheduler configs, read into our config structs and validated. The
//! first byte picks the reader.
#![no_main]

use agfsync_diffusion::schedulers::{build, SchedulerConfig, SchedulerKind};
use libfuzzer_sys::fuzz_target;

const KINDS: [SchedulerKind; 7] = [
    SchedulerKind::Ddim,
    SchedulerKind::Euler,
    SchedulerKind::EulerAncestral,
    SchedulerKind::DpmPlusPlus2M,
    SchedulerKind::DpmPlusPlus2MKarras,
    SchedulerKind::Ddpm,
    SchedulerKind::Lcm,
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match which % 11 {
        0 => {
            if let Ok(c) = agfsync_models::unet_2d_condition::UNet2DConditionConfig::from_json(text)
            {
                let _ = c.validate();
            }
        }
        1 => {
            if let Ok(c) = agfsync_models::clip_text::ClipTextConfig::from_json(text) {
                let _ = c.has_projection();
            }
        }
        2 => {
            if let Ok(c) = agfsync_models::autoencoder_kl::AutoencoderKlConfig::from_json(text) {
                let _ = c.scale_factor();
            }
        }
        3 => {
            if let Ok(c) = agfsync_models::bert::BertConfig::from_json(text) {
                let _ = c.validate();
            }
        }
        4 => {
            let _ = agfsync_models::llama::LlamaConfig::from_json(text);
        }
        5 => {
            let _ = agfsync_models::stable_diffusion::ModelIndex::from_json(text);
        }
        6 => {
            let _ = agfsync_feedback::clip::ClipConfig::from_json(text);
        }
        7 => {
            let _ = agfsync_feedback::open_clip::OpenClipConfig::from_json(text);
        }
        8 => {
            let _ = agfsync_feedback::llava::LlavaConfig::from_json(text);
        }
        9 => {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
                let _ = agfsync_feedback::preprocess::ImageProcessorConfig::from_json(&v);
            }
            let _ = agfsync_feedback::clip_vision::ClipVisionConfig::from_json(text);
        }
        _ => {
            let Ok(c) = SchedulerConfig::from_json_str(text) else {
                return;
            };
            let _ = c.betas();
            let _ = c.alphas_cumprod();
            let _ = SchedulerKind::from_config(&c);
            let steps = usize::from(which / 11) + 1;
            for kind in KINDS {
                if let Ok(mut s) = build(kind, &c) {
                    if s.set_timesteps(steps).is_ok() {
                        let _ = s.timesteps();
                        let _ = s.init_noise_sigma();
                    }
                }
            }
        }
    }
});
