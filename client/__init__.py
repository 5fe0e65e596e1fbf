"""HemoTriage thin client: decoding, preprocessing, registry, inference and Grad-CAM."""
