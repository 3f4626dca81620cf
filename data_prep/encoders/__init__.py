"""Item-content encoders for ``lgmrec extract``: text (:mod:`.text`, sentence-transformers) and images
(:mod:`.image`, torchvision-layout ResNets). Everything loads from local files only.
"""
from data_prep.encoders.image import (CROP, IMAGENET_MEAN, IMAGENET_STD, RESIZE, RESNET_ARCHS, ImageEncoder,
                                      build_resnet, detect_arch, load_image_bytes, match_arch, preprocess_image,
                                      read_state_dict)
from data_prep.encoders.text import (DEFAULT_TEXT_MODEL, TextEncoder, check_text_model, join_text_columns,
                                     load_sentence_transformer, resolve_text_model, set_offline)

__all__ = ["CROP", "IMAGENET_MEAN", "IMAGENET_STD", "RESIZE", "RESNET_ARCHS", "ImageEncoder", "build_resnet",
           "detect_arch", "load_image_bytes", "match_arch", "preprocess_image", "read_state_dict",
           "DEFAULT_TEXT_MODEL", "TextEncoder", "check_text_model", "join_text_columns",
           "load_sentence_transformer", "resolve_text_model", "set_offline"]
