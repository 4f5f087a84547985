"""Training-health diagnostics: dead feature maps and collapse to the class prior."""
