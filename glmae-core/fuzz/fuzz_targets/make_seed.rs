//! Writes seed inputs: the smallest valid model (int8 and f32) as a file and as a bare payload.
use glmae_core::format::Precision;
use glmae_core::{PosEmbed, UnetrConfig, VitConfig};

fn main() {
    let cfg = UnetrConfig {
        vit: VitConfig {
            in_channels: 1,
            img_size: [16, 16, 16],
            patch_size: 16,
            hidden_size: 6,
            depth: 12,
            num_heads: 1,
            mlp_dim: 6,
            qkv_bias: true,
            layer_norm_eps: 1e-6,
            pos_embed: PosEmbed::Learned,
        },
        feature_size: 1,
        out_channels: 2,
    };
    for (dir, skip) in [("corpus/parse_file", 0), ("corpus/parse_payload", 20)] {
        std::fs::create_dir_all(dir).unwrap();
        for (name, p) in [("int8", Precision::Int8), ("f32", Precision::F32)] {
            let bytes = glmae_core::synthetic::random_model(&cfg, 1, p).unwrap();
            std::fs::write(format!("{dir}/seed-{name}"), &bytes[skip..]).unwrap();
        }
    }
}
