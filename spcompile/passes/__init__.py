"""FX passes over the graph dynamo captures: detect attention sites, rewrite them, report."""
