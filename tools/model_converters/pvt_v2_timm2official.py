"""Convert timm ``pvt_v2_*`` weights to the official PVTv2 layout.

The official layout is what ``PVTv2`` / ``MesaPVTv2`` use, so the output loads with
``init_cfg=dict(type='Pretrained', checkpoint=DST)``. (``init_weights`` also
converts timm weights on the fly; this tool makes the file explicit.)

Usage:
    python tools/model_converters/pvt_v2_timm2official.py \\
        pvt_v2_b2/model.safetensors pretrain/pvt_v2_b2.pth
"""
import argparse
import os
import os.path as osp

import torch

from mesa_seg.models.checkpoint import timm_pvt_v2_to_official, unwrap_state_dict


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src', help='timm checkpoint (.pth/.bin or .safetensors)')
    parser.add_argument('dst', help='output path of the official-layout .pth')
    args = parser.parse_args()

    if args.src.endswith('.safetensors'):
        from safetensors.torch import load_file
        checkpoint = load_file(args.src, device='cpu')
    else:
        checkpoint = torch.load(args.src, map_location='cpu', weights_only=True)
    state_dict = timm_pvt_v2_to_official(unwrap_state_dict(checkpoint))
    if osp.dirname(args.dst):
        os.makedirs(osp.dirname(args.dst), exist_ok=True)
    torch.save(state_dict, args.dst)
    print(f'{len(state_dict)} tensors written to {args.dst}')


if __name__ == '__main__':
    main()
