"""On-registry formats shared by the converter (writes them) and the agent (reads them):
file TOCs, eStargz layers, gzip checkpoint indexes, index-only artifacts."""
