"""Wire formats. Pure translators: no trio, no h11, no httpcore in here."""
