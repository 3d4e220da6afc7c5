"""Text-to-image diffusion under the Splittable contract.

- `pipeline`: the models (`fashion-mnist-diffusion`, tiny random pipelines, local diffusers directories);
- `unet_split`: the UNet as segments, Λ-split symmetrically (skips stay on the device);
- `sampling`: the denoising loop's pure pieces, shared by every placement;
- `cloud`: the cloud parts of the `reference` and `unet-split` placements and their `DiffusionService`;
- `generate`: the device side, `generate_image` for placements none, reference and unet-split;
- `wire`: float codecs plus int8 affine quantisation packed into uint8 frames;
- `train`: trains and caches `fashion-mnist-diffusion`.
"""
