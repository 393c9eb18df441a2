"""interplab.scrub"""
