"""interplab.sae"""
